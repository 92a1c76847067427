"""Transparent mode (``jitckpt run --transparent``): JIT checkpointing for a
script that was not changed at all.

The launcher sets ``JITCKPT_TRANSPARENT``; the script's own
``dist.init_process_group`` is adopted (jitckpt.launch.adopt), which then
calls :func:`install`. From there the objects are found through torch's
own extension points, never by reading the script:

* every pass over a ``DataLoader`` whose sampler is a DistributedSampler
  goes through :meth:`Transparent.iterate` (``DataLoader.__iter__`` is
  wrapped; torchdata's StatefulDataLoader too when it is loaded);
* at the first draw from such a loader once a DDP model and an optimizer
  over its parameters exist, the model, the optimizer, its LR scheduler(s)
  and a GradScaler are looked up among the live objects and a
  :class:`~jitckpt.checkpoint.jit_checkpoint.JitCheckpoint` is made: it
  restores the newest checkpoint before the first forward;
* the global optimizer step hook names the training loader: the one whose
  batch the first optimizer step consumed. Its position (pass, batches
  consumed) is the data position, and the step boundaries are those of
  jitckpt.checkpoint.loop (before each draw that follows an optimizer step);
* training ends when the script does (jitckpt.launch.bootstrap reports a
  clean end).

A resumed process runs the script from its top: the training loader's
passes before the saved one yield nothing (fast-forward), the saved pass
skips its consumed batches without loading them, and the rest is the
script's own. What the script does between passes of skipped epochs (an
evaluation, its own saves) runs again; a loop that counts its own steps
(``for step in range(N)``) counts from 0 again: for such loops use the
user-level API (README, "Zero code change").

What transparent mode cannot follow is refused before the first optimizer
step, exit 78 (no restart can change it): no DDP model, more than one
optimizer, no DataLoader with a DistributedSampler feeding the step.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from jitckpt import events as ev
from jitckpt import protocol
from jitckpt.checkpoint.loop import BatchLoop
from jitckpt.errors import exit_fatal
from jitckpt.state import rng
from jitckpt.state.passes import ONE_OFF_MARK, PassPosition, skipping

# The reseed stream of a loader's pass in deterministic mode (by loader and
# pass, so a resumed run draws what the uninterrupted one drew).
LOADER_STREAM = 2_000_003
USER_LEVEL = "use the user-level API instead (README, 'The change to a training script')"

_runtime: Transparent | None = None


def install() -> None:
    """Start following this process's training (once)."""
    global _runtime
    if _runtime is not None:
        return
    _runtime = Transparent(
        os.environ[protocol.TRANSPARENT_RUN_DIR_ENV],
        deterministic=os.environ.get(protocol.DETERMINISTIC_ENV) == "1",
    )
    _runtime.install()


def sampler_of(loader: Any) -> Any:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return inner if isinstance(inner, DistributedSampler) else None


class Transparent:
    """One process's transparent mode: finds the objects, makes the
    JitCheckpoint, follows the training loader's passes."""

    def __init__(self, run_dir: str, *, deterministic: bool) -> None:
        self.run_dir = run_dir
        self.deterministic = deterministic
        self.rank = int(os.environ.get(protocol.RANK_ENV, "0"))
        self.ckpt: Any = None
        self.position = PassPosition()
        # Passes begun per loader (by data set), and each one's ordinal.
        self._passes: dict[int, int] = {}
        self._keys: dict[int, int] = {}
        self._datasets: list[Any] = []
        # The last batch drawn: (loader, key, pass index, batches consumed).
        self._last: tuple[Any, int, int, int] | None = None
        self._step_hook: Any = None
        self._originals: dict[type, Any] = {}

    # -- hooks ---------------------------------------------------------------------------
    def install(self) -> None:
        self._wrap_iter(DataLoader)
        try:
            from torchdata.stateful_dataloader import StatefulDataLoader
        except ImportError:
            pass
        else:
            self._wrap_iter(StatefulDataLoader)
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._step_hook = register_optimizer_step_pre_hook(self._first_step)

    def _wrap_iter(self, cls: type) -> None:
        original = cls.__dict__.get("__iter__")
        if original is None or cls in self._originals:
            return
        self._originals[cls] = original
        runtime = self

        def __iter__(loader: Any) -> Any:
            if getattr(loader, ONE_OFF_MARK, False):
                return original(loader)
            if sampler_of(loader) is None:
                return runtime.untracked(loader, original)
            return runtime.iterate(loader, original)

        setattr(cls, "__iter__", __iter__)  # noqa: B010 - a class attribute, replaced on purpose

    # -- passes --------------------------------------------------------------------------
    def untracked(self, loader: Any, original: Any) -> Iterator[Any]:
        """A pass over a loader without a DistributedSampler: only noted, so
        that a step fed by it is refused rather than pinned on another."""
        for batch in original(loader):
            self._last = None
            yield batch

    def iterate(self, loader: Any, original: Any) -> Iterator[Any]:
        """One pass over a loader with a DistributedSampler (runs at the
        first draw: by then the script has built what it trains). Loaders
        are told apart by their data set, so a script that makes its
        training loader anew every epoch is followed all the same."""
        dataset = loader.dataset
        if id(dataset) not in self._keys:
            self._keys[id(dataset)] = len(self._keys)
            self._datasets.append(dataset)  # alive while followed: its id stays its own
        key = self._keys[id(dataset)]
        index = self._passes.get(key, 0)
        self._passes[key] = index + 1
        if self.ckpt is None:
            self._make_checkpoint()
        if self.deterministic:
            rng.reseed(0, index, self.rank, stream=LOADER_STREAM + key)
        loop: BatchLoop | None = self.ckpt._loop if self.ckpt is not None else None
        training = False
        skip: int | None = 0
        if loop is not None and self.position.key == key:
            training = True
            resume = self.position.resume
            at_resume_point = resume is not None and index >= resume.pass_index
            if (
                at_resume_point
                and self._attach_late_schedulers(_find_objects()["schedulers"])
                and not self.position.fast_forwarded  # else begin() loads it again
            ):
                # Made after the restore (which had nothing to load them into):
                # load the restored state once more, now into them too.
                self.ckpt._load_again()
            skip = loop.begin(loader, index, replace=True)
            if skip is None:
                return  # before the resume point: fast-forwarded, nothing loaded
            if loop.replaying():
                training = False  # an idle pass before the resume point, as it was
            elif at_resume_point:
                self._say_fast_forward(index, skip)
        source = skipping(loader, skip or 0, original)
        consumed = skip or 0
        first = training
        try:
            while True:
                if loop is not None and (training or self._names_training(key)):
                    # (a fresh run names its training loader at the first
                    # optimizer step, inside this loader's first pass)
                    training = True
                    loop.before_draw(consumed, first)
                    first = False
                try:
                    batch = next(source)
                except StopIteration:
                    break
                consumed += 1
                self._last = (loader, key, index, consumed)
                yield batch
        finally:
            if loop is not None and training:
                loop.between_passes()

    def _names_training(self, key: int) -> bool:
        """A fresh run named this loader's key at the first optimizer step,
        during this very pass."""
        return self.position.key == key and self.position.resume is None

    def _say_fast_forward(self, index: int, skip: int) -> None:
        skipped = self.position.fast_forwarded
        if self.rank != 0 or not (skipped or skip):
            return
        print(
            f"jitckpt: transparent mode resumed the training loader at batch {skip} of pass "
            f"{index}: {skipped} earlier pass(es) yielded nothing and the script's "
            f"own code between them ran again; the {skip} batch(es) were skipped unloaded",
            file=sys.stderr,
            flush=True,
        )

    # -- finding the objects ---------------------------------------------------------------
    def _make_checkpoint(self) -> None:
        found = _find_objects()
        if found["model"] is None or found["optimizer"] is None:
            return  # not built yet: a later pass looks again
        from jitckpt.checkpoint.jit_checkpoint import JitCheckpoint

        scheduler, *more = found["schedulers"] or [None]
        self.ckpt = JitCheckpoint(
            self.run_dir,
            found["model"],
            found["optimizer"],
            scheduler=scheduler,
            loader=self.position,
            scaler=found["scaler"],
            extras={f"scheduler{i + 1}": s for i, s in enumerate(more)},
            deterministic=self.deterministic,
        )
        self.ckpt._batch_loop()

    def _first_step(self, optimizer: Any, *_: Any) -> None:
        """The global pre-hook of the first optimizer step: refuse what
        cannot be followed; in a fresh run, name the training loader."""
        self._step_hook.remove()
        reason = self._refusal(optimizer)
        if reason is not None:
            exit_fatal(
                f"--transparent cannot follow this script: {reason}; {USER_LEVEL}.", self.rank
            )
        loop = self.ckpt._loop
        if self.position.key is None and not loop.started:
            # A fresh run: the loader of the batch this step consumed trains.
            assert self._last is not None
            loader, key, index, consumed = self._last
            self.position.key = key
            loop.position.bind(loader)
            loop.position.begin_pass(index)
            for earlier in range(index):  # passes of it before the first step
                loop.position.mark_idle(earlier)
            # The step's batch is drawn: the clean state before it is step 0's.
            loop.before_draw(consumed - 1)
        # (Resumed, the checkpoint named the loader; a joiner is running.)
        self._say_what_is_followed()

    def _say_what_is_followed(self) -> None:
        state = self.ckpt.state
        loader = self.position.loader
        model = f"DistributedDataParallel({type(state.model.module).__name__})"
        schedulers = [type(s).__name__ for s in [state.scheduler, *state.extras.values()] if s]
        scaler = type(state.scaler).__name__ if state.scaler is not None else None
        batches = (
            f"{type(loader).__name__}({type(loader.dataset).__name__}, "
            f"batch_size={loader.batch_size}, {type(sampler_of(loader)).__name__})"
        )
        optimizer = type(state.optimizer).__name__
        self.ckpt.events.emit(
            ev.TRANSPARENT_FOLLOWS,
            model=model,
            optimizer=optimizer,
            schedulers=schedulers,
            scaler=scaler,
            loader=batches,
        )
        if self.rank == 0 and self.ckpt._joining is None:
            parts = [model, optimizer, *schedulers, *([scaler] if scaler else [])]
            print(
                f"jitckpt: transparent mode follows {', '.join(parts)} and the batches of "
                f"{batches}",
                file=sys.stderr,
                flush=True,
            )

    def _refusal(self, optimizer: Any) -> str | None:
        found = _find_objects()
        optimizers = [o for o in found["optimizers"] if _has_params(o)]
        if len(optimizers) > 1:
            names = ", ".join(type(o).__name__ for o in optimizers)
            return (
                f"it has {len(optimizers)} optimizers ({names}), and transparent mode follows "
                f"one (steps are counted by it)"
            )
        if found["model"] is None:
            models = [type(m).__name__ for m in found["modules"]]
            return "the model is not wrapped in DistributedDataParallel" + (
                f" (found {', '.join(sorted(set(models))[:3])})" if models else ""
            )
        if self._last is None:
            return (
                "no torch DataLoader with a DistributedSampler fed the first optimizer step, "
                "so the data position cannot be followed"
            )
        if self.ckpt is None:
            return (
                "the DDP model or its optimizer was made after the first batch was drawn, and "
                "transparent mode restores the state before that draw"
            )
        if self.ckpt.state.optimizer is not optimizer:
            return "the optimizer that stepped does not optimize the DDP model's parameters"
        self._attach_late_schedulers(found["schedulers"])
        return None

    def _attach_late_schedulers(self, schedulers: list[Any]) -> bool:
        """LR schedulers made after the JitCheckpoint (the script drew a batch
        first: a peek): followed from now on. Returns whether any was new."""
        state = self.ckpt.state
        followed = {id(s) for s in [state.scheduler, *state.extras.values()]}
        late = [s for s in schedulers if id(s) not in followed]
        for scheduler in late:
            if state.scheduler is None:
                state.scheduler = scheduler
            else:
                state.extras[f"scheduler{len(state.extras) + 1}"] = scheduler
        return bool(late)


def _has_params(optimizer: Any) -> bool:
    return any(group["params"] for group in optimizer.param_groups)


def _find_objects() -> dict[str, Any]:
    """The live DDP model, optimizers, LR schedulers and GradScaler."""
    ddp_type = torch.nn.parallel.DistributedDataParallel
    models, optimizers, schedulers, scalers, modules = [], [], [], [], []
    for obj in gc.get_objects():
        if isinstance(obj, ddp_type):
            models.append(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            optimizers.append(obj)
        elif isinstance(obj, torch.optim.lr_scheduler.LRScheduler):
            schedulers.append(obj)
        elif isinstance(obj, torch.amp.GradScaler):
            scalers.append(obj)
        elif type(obj).__module__ == "__main__" and isinstance(obj, torch.nn.Module):
            modules.append(obj)
    model = models[0] if len(models) == 1 else None
    optimizer = None
    if model is not None:
        params = {id(p) for p in model.parameters()}
        over_model = [
            o
            for o in optimizers
            if any(id(p) in params for g in o.param_groups for p in g["params"])
        ]
        optimizer = over_model[0] if len(over_model) == 1 else None
    own = [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
    # SequentialLR and ChainedScheduler hold others: their state is theirs.
    inner = {id(c) for s in own for c in getattr(s, "_schedulers", [])}
    return {
        "model": model,
        "optimizer": optimizer,
        "optimizers": optimizers,
        "schedulers": [s for s in own if id(s) not in inner],
        "scaler": scalers[0] if len(scalers) == 1 else None,
        "modules": modules,
    }
