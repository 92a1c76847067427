"""torchtitan (0.3): ``attach(trainer)`` writes a JIT save as torchtitan's
own ``step-N`` checkpoint.

One line in a torchtitan training script (``torchtitan/train.py``), under
``jitckpt run``::

    trainer = config.build()
    attach(trainer)          # jitckpt.integrations.torchtitan
    trainer.train()

with ``--checkpoint.enable`` (the export goes to the checkpoint folder). When
a rank crashes, hangs, raises or is preempted, the survivor that saves
(jitckpt's own copy in ``<dump_folder>/jitckpt``) also writes
``<checkpoint.folder>/step-N``: a DCP checkpoint with exactly the entries
``CheckpointManager`` saves and loads (the model's state dict flattened to
the top level as ``ModelWrapper`` does, ``optimizer`` as the
``OptimizersContainer``'s flat FQN-keyed state dict, ``lr_scheduler``,
``dataloader``, ``train_state`` and any other entry of the manager's
``states``), plus jitckpt's marker file (export.MARKER). torchtitan's own
resume (the newest ``step-N`` holding a ``.metadata``) loads it: the same
command, the same arguments. torchtitan restores the state, never jitckpt:
``attach`` makes the JitCheckpoint after torchtitan's ``load`` and tells it
the step torchtitan resumed (``JitCheckpoint(resumed_by_framework=...)``).

Where: the step boundary is the end of ``lr_schedulers.step()`` (after
``optimizers.step()``, with ``trainer.step`` already counting the step),
before the metrics collectives and torchtitan's own save, so a survivor
blocked anywhere in the next step holds a clean state. The data loader's
state and ``train_state`` are taken at the boundary; the model, optimizer
and scheduler are read when the export runs (the loop is held still).
Hang detection is paused during torchtitan's own save and validation.

What is exported and how:

* one process writes the whole checkpoint (``dcp.save(no_dist=True)``, no
  collective), into a temporary directory renamed into place; a ``step-N``
  already there that jitckpt did not write (torchtitan's own) is never
  overwritten, and step 0 is not exported (torchtitan resumes step 0 as a
  model-only checkpoint; a fresh start is the same state);
* so every rank must hold whole tensors: one GPU, or pure data parallelism
  (``dp_replicate`` x ``fsdp`` of 1). torchtitan always applies
  ``fully_shard``; with an ``fsdp`` degree of 1 the DTensors' local tensors
  are whole and are written as such (DCP loads them onto any mesh).
  FSDP/TP/CP/EP degrees above 1 and pipeline parallelism are refused by
  ``attach`` (the survivor does not hold the other ranks' shards);
* the data loader's state is per data-parallel rank (``dp_rank_R``); the
  exporter has its own. Every other rank's entry is a copy of it (that rank
  continues its own data shard from the exporter's position, not exactly its
  own; listed as ``dataloader_copied_for`` in the marker). With one
  data-parallel rank it is exact.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torchtitan.components.checkpoint import (
    DATALOADER,
    MODEL,
    TRAIN_STATE,
    CheckpointManager,
)

from jitckpt.checkpoint.jit_checkpoint import FrameworkResume, JitCheckpoint
from jitckpt.errors import UsageError
from jitckpt.integrations.export import export_directory, read_marker

STEP_PREFIX = "step-"
_DP_RANK = re.compile(r"dp_rank_(\d+)")
# Boundary snapshots kept (the saved step is the newest, or the one before
# it when a failure strikes inside a boundary).
_KEEP_SNAPSHOTS = 3


class ExportError(RuntimeError):
    """The state cannot be written as a ``step-N`` by one process."""


def attach(
    trainer: Any,
    run_dir: str | os.PathLike[str] | None = None,
    *,
    hang_timeout_s: float | None = None,
    stage_dir: str | os.PathLike[str] | None = None,
) -> TorchtitanJit:
    """JIT checkpointing for a torchtitan ``Trainer`` (module docstring).
    Call it after the Trainer is built and before ``trainer.train()``.

    Args:
        trainer: the torchtitan Trainer (or anything with its
            ``checkpointer``, ``model_parts``, ``optimizers``,
            ``lr_schedulers``, ``dataloader``, ``step`` and ``train()``).
        run_dir: jitckpt's own run directory; default ``jitckpt`` beside
            the checkpoint folder (``<dump_folder>/jitckpt``).
        hang_timeout_s, stage_dir: see JitCheckpoint.
    """
    return TorchtitanJit(trainer, run_dir, hang_timeout_s=hang_timeout_s, stage_dir=stage_dir)


class TorchtitanJit:
    """What :func:`attach` installs on a Trainer; ``ckpt`` is the
    JitCheckpoint once torchtitan's ``load`` has run."""

    def __init__(
        self,
        trainer: Any,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        hang_timeout_s: float | None = None,
        stage_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        checkpointer = trainer.checkpointer
        check_trainer(trainer)
        self.trainer = trainer
        self.checkpointer = checkpointer
        self.folder = Path(checkpointer.folder)
        self.run_dir = Path(run_dir) if run_dir is not None else self.folder.parent / "jitckpt"
        self.hang_timeout_s = hang_timeout_s
        self.stage_dir = stage_dir
        self.ckpt: JitCheckpoint | None = None
        self._train_states: dict[int, dict[str, Any]] = {}
        self._wrap()

    # -- the Trainer's points ------------------------------------------------------------
    def _wrap(self) -> None:
        """Instance attributes over the Trainer's own methods (nothing of
        torchtitan's classes changes)."""
        trainer, checkpointer = self.trainer, self.checkpointer
        load, save, train = checkpointer.load, checkpointer.save, trainer.train
        schedule_step = trainer.lr_schedulers.step

        def jit_load(step: int = -1) -> bool:
            loaded = bool(load(step))
            self._start()
            return loaded

        def jit_save(curr_step: int, last_step: bool = False) -> bool:
            with self._paused():
                return bool(save(curr_step, last_step))

        def jit_lr_step() -> None:
            schedule_step()
            self.boundary()

        def jit_train(*args: Any, **kwargs: Any) -> Any:
            result = train(*args, **kwargs)
            if self.ckpt is not None:
                self.ckpt.finish(int(trainer.step))
            return result

        checkpointer.load = jit_load
        checkpointer.save = jit_save
        trainer.lr_schedulers.step = jit_lr_step
        trainer.train = jit_train
        validator = getattr(trainer, "validator", None)
        if validator is not None and callable(getattr(validator, "validate", None)):
            validate = validator.validate

            def jit_validate(*args: Any, **kwargs: Any) -> Any:
                with self._paused():
                    return validate(*args, **kwargs)

            validator.validate = jit_validate

    def _paused(self) -> Any:
        return self.ckpt.paused() if self.ckpt is not None else contextlib.nullcontext()

    def _start(self) -> None:
        """torchtitan has loaded (or found nothing): the state is where it
        resumes. Make the JitCheckpoint and mark the first boundary."""
        if self.ckpt is not None:
            return
        trainer = self.trainer
        step = int(trainer.step)
        path = self.folder / f"{STEP_PREFIX}{step}" if step > 0 else None
        marker = read_marker(path)
        resumed = FrameworkResume(
            step, str(path) if path else None, marker.get("kind", "jit") if marker else "framework"
        )
        model = trainer.model_parts[0]
        self.ckpt = JitCheckpoint(
            self.run_dir,
            model,
            trainer.optimizers.optimizers[0],
            scheduler=trainer.lr_schedulers,
            loader=trainer.dataloader,
            hang_timeout_s=self.hang_timeout_s,
            stage_dir=self.stage_dir,
            on_saved=self._export,
            resumed_by_framework=resumed,
        )
        self.boundary()

    def boundary(self) -> None:
        """``trainer.step`` steps are complete and the state is clean."""
        if self.ckpt is None:
            return
        step = int(self.trainer.step)
        train_state = self.checkpointer.states.get(TRAIN_STATE)
        if train_state is not None:
            self._train_states[step] = copy.deepcopy(train_state.state_dict())
            for old in sorted(self._train_states)[:-_KEEP_SNAPSHOTS]:
                del self._train_states[old]
        self.ckpt.step_done(step)

    # -- the export ----------------------------------------------------------------------
    def _export(self, step: int, tree: Any, saved: Path) -> Path | None:
        assert self.ckpt is not None
        data = tree.get("data") if isinstance(tree, Mapping) else None
        if TRAIN_STATE in self.checkpointer.states and step not in self._train_states:
            # The live one may count the step in flight: never write it.
            raise ExportError(f"no train_state was taken at the boundary of step {step}")
        return write_step(
            self.folder,
            step,
            self.checkpointer.states,
            dataloader_state=data.get("loader") if isinstance(data, Mapping) else None,
            train_state=self._train_states.get(step),
            rank=self.ckpt.rank,
            marker={"jitckpt_checkpoint": str(saved)},
        )


def check_trainer(trainer: Any) -> None:
    """Refuse, before training, what one process cannot export."""
    checkpointer = trainer.checkpointer
    if not isinstance(checkpointer, CheckpointManager) or not checkpointer.enable:
        raise UsageError(
            "jitckpt.integrations.torchtitan writes a JIT save into torchtitan's checkpoint "
            "folder and needs its DCP CheckpointManager enabled: add --checkpoint.enable"
        )
    if "://" in str(checkpointer.folder):
        raise UsageError(
            f"jitckpt.integrations.torchtitan exports to a local checkpoint folder; "
            f"{checkpointer.folder} is remote"
        )
    if len(trainer.model_parts) != 1:
        raise UsageError(
            f"jitckpt.integrations.torchtitan supports one model part (no pipeline "
            f"parallelism); this trainer has {len(trainer.model_parts)}"
        )
    optimizers = list(trainer.optimizers.optimizers)
    if len(optimizers) != 1:
        raise UsageError(
            f"jitckpt.integrations.torchtitan supports one optimizer per model part; this "
            f"trainer has {len(optimizers)} ({', '.join(type(o).__name__ for o in optimizers)})"
        )
    for name, tensor in trainer.model_parts[0].state_dict().items():
        if _split(tensor):
            raise UsageError(
                f"jitckpt.integrations.torchtitan writes step-N from one surviving rank, which "
                f"must hold whole tensors; '{name}' is sharded over "
                f"{tuple(tensor.device_mesh.shape)} ({tensor.placements}). Use an FSDP/TP/CP/EP "
                f"degree of 1 (data parallelism by --parallelism.data_parallel_replicate_degree)."
            )


# -- writing step-N ------------------------------------------------------------------------
def write_step(
    folder: str | os.PathLike[str],
    step: int,
    states: Mapping[str, Any],
    *,
    dataloader_state: Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
    rank: int = 0,
    marker: Mapping[str, Any] | None = None,
) -> Path | None:
    """Write ``folder/step-{step}`` as torchtitan's CheckpointManager saves
    it, from this process alone. ``states`` is the manager's ``states``
    (``model``: a ModelWrapper, ``optimizer``, ``lr_scheduler``,
    ``dataloader``, ``train_state``, ...); ``dataloader_state`` and
    ``train_state`` replace the live ones (taken at the step boundary).
    Returns the directory, or None when it was not written (step 0, or a
    ``step-{step}`` torchtitan wrote itself)."""
    if step <= 0:
        return None
    flat, copied = torchtitan_state(states, dataloader_state, train_state)

    def write_shared(directory: Path) -> None:
        dcp.save(flat, checkpoint_id=str(directory), no_dist=True)

    return export_directory(
        Path(folder) / f"{STEP_PREFIX}{step}",
        rank,
        write_shared,
        lambda _directory: None,  # nothing per rank (torchtitan saves no RNG state)
        {"kind": "jit", "step": step, "dataloader_copied_for": copied, **(marker or {})},
        # torchtitan takes any name holding "step-<digits>" for a checkpoint
        # (to resume and to purge): the temporary directory must not.
        temporary=f".jitckpt-tmp-{step}",
    )


def torchtitan_state(
    states: Mapping[str, Any],
    dataloader_state: Mapping[str, Any] | None = None,
    train_state: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[int]]:
    """The dict torchtitan's CheckpointManager hands to ``dcp.save``
    (``_flattened_model_states_sd``), resolved to plain values and whole
    tensors; and the data-parallel ranks whose loader state is a copy."""
    flat: dict[str, Any] = {}
    copied: list[int] = []
    for key, value in states.items():
        if key == MODEL:
            continue
        if key == DATALOADER and dataloader_state is not None:
            value, copied = every_dp_rank(dataloader_state)
        elif key == TRAIN_STATE and train_state is not None:
            value = dict(train_state)
        elif hasattr(value, "state_dict"):
            value = value.state_dict()
        flat[key] = _whole(value, key)
    if MODEL in states:
        for name, tensor in states[MODEL].state_dict().items():
            flat[name] = _whole(tensor, name)
    return flat, copied


def every_dp_rank(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """A ParallelAwareDataloader's state (``{"dp_rank_R": ..., "world_size":
    W}``) with an entry for every data-parallel rank: the missing ones are
    copies of R's. Returns the state and the ranks copied for."""
    filled = dict(state)
    own = [key for key in state if _DP_RANK.fullmatch(str(key))]
    world = state.get("world_size")
    if len(own) != 1 or not isinstance(world, int):
        return filled, []
    copied = []
    for dp_rank in range(world):
        key = f"dp_rank_{dp_rank}"
        if key not in filled:
            filled[key] = state[own[0]]
            copied.append(dp_rank)
    return filled, copied


def _split(value: Any) -> bool:
    """A DTensor whose local tensor is not the whole tensor."""
    local = getattr(value, "_local_tensor", None)
    return isinstance(local, torch.Tensor) and tuple(local.shape) != tuple(value.shape)


def _whole(value: Any, where: str) -> Any:
    """``value`` with every DTensor replaced by its local tensor, which must
    be the whole tensor (a replicated or single-rank mesh)."""
    if isinstance(value, torch.Tensor):
        local = getattr(value, "_local_tensor", None)
        if not isinstance(local, torch.Tensor):
            return value
        if _split(value):
            raise ExportError(
                f"'{where}' is sharded ({tuple(local.shape)} of {tuple(value.shape)}): one "
                f"process cannot write it"
            )
        return local.detach()
    if isinstance(value, Mapping):
        return {key: _whole(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_whole(item, where) for item in value)
    return value
