"""PyTorch Lightning 2.x: ``JitCheckpointCallback``, a ``Callback`` for the
DDP strategy.

One line in a training script, under ``jitckpt run``; the resume is
Lightning's own ``ckpt_path="last"``, which needs a ModelCheckpoint whose
directory is the same in every run (a ``dirpath``)::

    trainer = L.Trainer(..., strategy="ddp", callbacks=[
        JitCheckpointCallback(),
        ModelCheckpoint(dirpath="ckpts", save_last=True),
    ])
    trainer.fit(model, ckpt_path="last")

When a rank crashes, hangs, raises or is preempted, the survivors save the
last completed step (jitckpt's own checkpoint in ``default_root_dir/jitckpt``)
and write it as a Lightning checkpoint too, ``last-jitckpt-step=N.ckpt`` in
that ModelCheckpoint's directory (the first one with a ``dirpath``; else
``default_root_dir/checkpoints``, or ``dirpath=`` here): the checkpoint
``trainer.save_checkpoint`` would have written at that step, with
``state_dict``, ``optimizer_states``, ``lr_schedulers``, ``loops`` (the fit
loop's progress), ``callbacks``, ``epoch``, ``global_step``,
``hyper_parameters``, and what the ``on_save_checkpoint`` hooks add. Its
name matches ModelCheckpoint's ``last*.ckpt``, so ``ckpt_path="last"`` takes
it when it is the newest (of several survivors' exports, the highest step is
made the newest). A checkpoint Lightning wrote is never replaced, and the
exports are removed when training ends. Lightning restores everything but
a plain DataLoader's position: resumed in the middle of an epoch, it draws
that epoch's batches from the first again while its batch and step counts
go on, so the epoch ends on time with its first batches trained twice and
its last ones not at all (Lightning warns); later epochs are as without
the failure.

Where: the step boundary is ``on_train_batch_end`` after an optimizer step
(Lightning has stepped the optimizer and the step-interval schedulers and
counted ``global_step``; its own logging and the next batch's collectives
come after), so ``--inject`` counts ``global_step``. Lightning runs
forward and backward inside ``optimizer.step(closure)``: a step pre-hook
registered before jitckpt's runs the closure first, so that the dirty
window opens only after the gradient all-reduce. The Lightning state of
each boundary (loop progress, callback states: small dicts) is kept in
memory, since a survivor's main thread may be blocked in a dead collective
(``trainer.save_checkpoint`` runs barriers). State changed after this
callback's ``on_train_batch_end`` (the LightningModule's own hook runs
later) is saved as it is when the failure comes.

Not supported: several optimizers, sharded strategies (FSDP, DeepSpeed).
In-process recovery does not apply (the launcher says so and restarts).
Validation and Lightning's own checkpoint saves pause hang detection.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loops.loop import _Loop
from lightning.pytorch.loops.progress import _BaseProgress
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from jitckpt import _version
from jitckpt.checkpoint.jit_checkpoint import FrameworkResume, JitCheckpoint
from jitckpt.errors import exit_fatal
from jitckpt.integrations.export import copied, export_file
from jitckpt.state.training import unwrap

# ModelCheckpoint's ``ckpt_path="last"`` takes the newest file whose name
# starts with "last" and ends in ".ckpt" (ModelCheckpoint._find_last_checkpoints).
PREFIX = "last-jitckpt-step="
EXPORT_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)\.ckpt$")
MARKER_KEY = "jitckpt"
MODULE_EXTRA = "lightning_module"


class JitCheckpointCallback(Callback):
    """JIT checkpointing for ``lightning.pytorch.Trainer`` (module docstring).

    Args:
        run_dir: jitckpt's own run directory (event log, its checkpoints);
            default ``default_root_dir/jitckpt``.
        dirpath: where the Lightning checkpoint of a failure goes; default
            the directory ``ckpt_path="last"`` searches (module docstring).
        hang_timeout_s: see JitCheckpoint (default: 4 x the median step).
        stage_dir: see JitCheckpoint.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        dirpath: str | os.PathLike[str] | None = None,
        hang_timeout_s: float | None = None,
        stage_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.dirpath = dirpath
        self.hang_timeout_s = hang_timeout_s
        self.stage_dir = stage_dir
        self.ckpt: JitCheckpoint | None = None
        self._trainer: Any = None
        self._directory: Path | None = None
        self._loaded_kind = "framework"
        self._dir_per_run = False  # a ModelCheckpoint's directory changes every run
        # step -> the Lightning state of that boundary (the last two): replaced
        # whole by the training thread, read by the saver.
        self._captured: dict[int, dict[str, Any]] = {}
        self._last_step = -1
        self._pauses: set[str] = set()
        self._started_at = 0.0
        self._closure_hook: Any = None
        self._other_loops: dict[str, Any] = {}
        self._loop_state: Any = loop_state

    # -- Lightning's hooks ---------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning runs checkpoint callbacks after all others, so their
        # setup (which resolves a missing dirpath) has not run yet.
        first = _model_checkpoint(trainer)
        self._dir_per_run = (
            first is not None
            and first.dirpath is None
            and bool(trainer.loggers)
            and not self.dirpath
        )

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        marker = checkpoint.get(MARKER_KEY)
        self._loaded_kind = (
            str(marker.get("kind", "jit")) if isinstance(marker, Mapping) else "framework"
        )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        refusal = _refusal(trainer, again=self.ckpt is not None)
        if refusal is not None:
            # The script's configuration: no restart can get past it (exit 78).
            exit_fatal(f"JitCheckpointCallback: {refusal}", trainer.global_rank)
        self._trainer = trainer
        self._started_at = time.time()
        self._other_loops = {
            name: getattr(trainer, name).state_dict()
            for name in ("validate_loop", "test_loop", "predict_loop")
        }
        if loop_state(trainer.fit_loop) != trainer.fit_loop.state_dict():
            # Loops unlike the ones loop_state() mirrors (another Lightning):
            # Lightning's own state_dict(), at its cost, for this fit.
            self._loop_state = lambda loop: loop.state_dict()
        self._directory = self._export_directory(trainer)
        optimizer = trainer.optimizers[0]
        if not isinstance(optimizer, torch.optim.LBFGS):  # it calls its closure repeatedly
            self._closure_hook = optimizer.register_step_pre_hook(_closure_first)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        extras: dict[str, Any] = {f"lr_scheduler_{i}": s for i, s in enumerate(schedulers) if i}
        if unwrap(pl_module) is not pl_module:
            # jitckpt saves a `.module` as the model (DDP's way): keep the whole one too.
            extras[MODULE_EXTRA] = pl_module
        step = int(trainer.global_step)
        run_dir = self.run_dir
        self.ckpt = JitCheckpoint(
            run_dir if run_dir is not None else Path(trainer.default_root_dir) / "jitckpt",
            pl_module,
            optimizer,
            scheduler=schedulers[0] if schedulers else None,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            extras=extras,
            hang_timeout_s=self.hang_timeout_s,
            stage_dir=self.stage_dir,
            on_saved=self._export,
            resumed_by_framework=FrameworkResume(
                step, str(trainer.ckpt_path) if step else None, self._loaded_kind
            ),
        )
        if trainer.is_global_zero:
            self._warn_about_resume(step)
        self._boundary(trainer)

    def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
        self._resume("save")

    def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
        if self.ckpt is not None:
            self._boundary(trainer)

    def on_validation_start(self, trainer: Any, *_: Any) -> None:
        self._pause("validation")

    def on_validation_end(self, trainer: Any, *_: Any) -> None:
        self._resume("validation")

    def on_save_checkpoint(self, trainer: Any, *_: Any) -> None:
        # Lightning's own save (its barrier and the write) is no step: the
        # next batch resumes hang detection.
        self._pause("save")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.ckpt is None:
            return
        self._pauses.clear()
        self.ckpt.finish(int(trainer.global_step))
        if self._closure_hook is not None:
            self._closure_hook.remove()
        if trainer.is_global_zero and self._directory is not None:
            # Training went past every failure: its exports are stale now.
            for path, _ in _exports(self._directory):
                path.unlink(missing_ok=True)

    # -- step boundaries -----------------------------------------------------------------
    def _boundary(self, trainer: Any) -> None:
        assert self.ckpt is not None
        step = int(trainer.global_step)
        if step == self._last_step:
            return  # a batch of gradient accumulation: no optimizer step
        # Captured before step_done(): a saver may park the thread there.
        # The other loops do not move during fit (taken once, on_train_start).
        captured = {
            "epoch": int(trainer.current_epoch),
            "loops": {"fit_loop": self._loop_state(trainer.fit_loop), **self._other_loops},
            "callbacks": _containers_copied(
                {cb.state_key: state for cb in trainer.callbacks if (state := cb.state_dict())}
            ),
        }
        previous = self._captured.get(self._last_step)
        self._captured = (
            {step: captured} if previous is None else {self._last_step: previous, step: captured}
        )
        self._last_step = step
        self.ckpt.step_done(step)

    def _pause(self, reason: str) -> None:
        if self.ckpt is None or self._trainer is None or self._trainer.sanity_checking:
            return
        if not self._pauses:
            self.ckpt.watchdog.pause()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._pauses or self.ckpt is None:
            return
        self._pauses.discard(reason)
        if not self._pauses:
            self.ckpt.watchdog.resume()

    # -- the export ----------------------------------------------------------------------
    def _export(self, step: int, tree: Any, saved: Path) -> Path | None:
        """Write step ``step`` (the saved ``tree``) as a Lightning checkpoint."""
        assert self._directory is not None and self.ckpt is not None
        trainer = self._trainer
        captured = self._captured.get(step)
        if captured is None:
            raise RuntimeError(f"no Lightning state was kept for step {step}")
        checkpoint = lightning_checkpoint(trainer, step, tree, captured)
        checkpoint[MARKER_KEY] = {
            "kind": "jit",
            "step": step,
            "jitckpt_checkpoint": str(saved),
            "writer_rank": self.ckpt.rank,
            "jitckpt_version": _version.__version__,
        }
        final = self._directory / f"{PREFIX}{step}.ckpt"
        exported = export_file(final, self.ckpt.rank, lambda path: torch.save(checkpoint, path))
        self._newest_is_highest()
        return exported

    def _newest_is_highest(self) -> None:
        """Of this attempt's exports (every survivor writes its own step),
        make the highest step the newest file: ``ckpt_path="last"`` takes
        the newest."""
        assert self._directory is not None
        current = [(step, path) for path, step in _exports(self._directory, self._started_at)]
        if current:
            step, path = max(current)
            newest = max(p.stat().st_mtime for _, p in current)
            if path.stat().st_mtime < newest:
                os.utime(path)

    def _export_directory(self, trainer: Any) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        first = _model_checkpoint(trainer)
        if first is not None and first.dirpath is not None:
            return Path(first.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    def _warn_about_resume(self, step: int) -> None:
        assert self._directory is not None
        if self._dir_per_run:
            rank_zero_warn(
                "JitCheckpointCallback: the ModelCheckpoint has no dirpath, so its directory is "
                "the logger's version directory, a new one in each run unless the logger's "
                "version is fixed: `ckpt_path='last'` of a restarted job would not find the "
                "checkpoint jitckpt writes on a failure. Give ModelCheckpoint(dirpath=...)."
            )
        if step == 0 and (found := _exports(self._directory)):
            rank_zero_warn(
                f"JitCheckpointCallback: training starts at step 0, but {found[-1][0]} holds a "
                "failure's checkpoint: resume with trainer.fit(..., ckpt_path='last')."
            )


def lightning_checkpoint(
    trainer: Any, step: int, tree: Mapping[str, Any], captured: Mapping[str, Any]
) -> dict[str, Any]:
    """What ``trainer.save_checkpoint`` writes at step ``step``
    (``_CheckpointConnector.dump_checkpoint``), from jitckpt's saved
    ``tree`` and the Lightning state ``captured`` at that boundary."""
    model = trainer.lightning_module
    extras = tree.get("extras") or {}
    state_dict = extras.get(MODULE_EXTRA, tree["model"])
    schedulers = [tree["scheduler"]] if tree.get("scheduler") is not None else []
    schedulers += [extras[f"lr_scheduler_{i}"] for i in range(1, len(trainer.lr_scheduler_configs))]
    checkpoint: dict[str, Any] = {
        "epoch": captured["epoch"],
        "global_step": step,
        "pytorch-lightning_version": pl.__version__,
        "state_dict": copied(state_dict),
        "loops": copy.deepcopy(captured["loops"]),
        "callbacks": copy.deepcopy(captured["callbacks"]),
        "optimizer_states": [copied(tree["optimizer"])],
        "lr_schedulers": copy.deepcopy(schedulers),
    }
    precision = trainer.precision_plugin
    if tree.get("scaler") is not None:
        checkpoint[type(precision).__qualname__] = copied(tree["scaler"])
    precision.on_save_checkpoint(checkpoint)
    datamodule = trainer.datamodule
    for obj in (model, datamodule):
        if obj is not None and obj.hparams:
            if hasattr(obj, "_hparams_name"):
                checkpoint[obj.CHECKPOINT_HYPER_PARAMS_NAME] = obj._hparams_name
            checkpoint[obj.CHECKPOINT_HYPER_PARAMS_KEY] = dict(obj.hparams)
    if datamodule is not None and (state := datamodule.state_dict()):
        checkpoint[type(datamodule).__qualname__] = state
    for callback in trainer.callbacks:
        if not isinstance(callback, JitCheckpointCallback):
            callback.on_save_checkpoint(trainer, model, checkpoint)
    model.on_save_checkpoint(checkpoint)
    return checkpoint


def loop_state(
    loop: Any, destination: dict[str, Any] | None = None, prefix: str = ""
) -> dict[str, Any]:
    """``loop.state_dict()`` in a fifth of its time (~30 us instead of
    ~150 us for the fit loop, taken at every step). The same walk
    (``_Loop.state_dict``: each loop's ``on_save_checkpoint()``, then its
    progress trackers and child loops, in attribute order), but a progress
    tracker's fields are read directly instead of through
    ``dataclasses.asdict``, which deep-copies every int. The callback checks
    once per fit that this equals Lightning's own."""
    if destination is None:
        destination = {}
    destination[prefix + "state_dict"] = loop.on_save_checkpoint()
    for name, value in vars(loop).items():
        key = prefix + name
        if isinstance(value, _BaseProgress):
            fields = (
                _progress_fields(value) if type(value).state_dict is _PLAIN_STATE_DICT else None
            )
            destination[key] = value.state_dict() if fields is None else fields
        elif isinstance(value, _Loop):
            loop_state(value, destination, key + ".")
    return destination


_PLAIN_STATE_DICT = _BaseProgress.state_dict
_ATOMS = (int, float, bool, str, type(None))
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _progress_fields(tracker: Any) -> dict[str, Any] | None:
    """``dataclasses.asdict(tracker)`` for a dataclass whose fields are
    plain values or such dataclasses; None for any other (the caller then
    asks the tracker itself)."""
    names = _FIELD_NAMES.get(type(tracker))
    if names is None:
        names = _FIELD_NAMES[type(tracker)] = tuple(f.name for f in dataclasses.fields(tracker))
    fields: dict[str, Any] = {}
    for name in names:
        value = getattr(tracker, name)
        if type(value) in _ATOMS:
            fields[name] = value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            inner = _progress_fields(value)
            if inner is None:
                return None
            fields[name] = inner
        else:
            return None
    return fields


def _refusal(trainer: Any, *, again: bool) -> str | None:
    """Why this training cannot be covered, if it cannot."""
    if again:
        return "it covers one trainer.fit() per process"
    if len(trainer.optimizers) != 1:
        return f"it needs exactly one optimizer ({len(trainer.optimizers)} configured)"
    if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
        return f"it supports the DDP strategy, not {type(trainer.strategy).__name__}"
    return None


def _closure_first(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Lightning passes forward and backward as the closure of
    ``optimizer.step(closure)``, so the torch optimizer's step pre-hooks
    (which open jitckpt's dirty window) would run before them. Run the
    closure here, before those hooks, and hand the step its result."""
    closure = kwargs.get("closure")
    if closure is None:
        return None
    with torch.enable_grad():
        result = closure()
    return args, {**kwargs, "closure": lambda: result}


def _containers_copied(tree: Any) -> Any:
    """``tree`` with its dicts and lists copied, the values in them shared:
    a callback's state_dict() may hand out a container it goes on changing
    (ModelCheckpoint's best_k_models), while values are replaced, not
    changed in place. A tenth of what copy.deepcopy costs."""
    if isinstance(tree, dict):
        return {key: _containers_copied(value) for key, value in tree.items()}
    if type(tree) in (list, tuple):  # not a named tuple
        return type(tree)(_containers_copied(value) for value in tree)
    return tree


def _model_checkpoint(trainer: Any) -> ModelCheckpoint | None:
    """The ModelCheckpoint whose directory ``ckpt_path="last"`` searches
    first: the first with a directory, else the first."""
    found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    with_dir = [cb for cb in found if cb.dirpath is not None]
    return next(iter(with_dir or found), None)


def _exports(directory: Path, since: float | None = None) -> list[tuple[Path, int]]:
    """This callback's exports in ``directory`` (modified at ``since`` or
    later), by step."""
    found = []
    for path in directory.glob(f"{PREFIX}*.ckpt"):
        match = EXPORT_NAME.match(path.name)
        try:
            if match and (since is None or path.stat().st_mtime >= since):
                found.append((path, int(match.group(1))))
        except FileNotFoundError:
            continue
    return sorted(found, key=lambda item: item[1])
