"""Hugging Face Trainer: ``JitCheckpointCallback``, a ``TrainerCallback``.

One line in a training script, under ``jitckpt run``::

    trainer = Trainer(..., callbacks=[JitCheckpointCallback()])
    trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir))

When a rank crashes, hangs, raises or is preempted, the survivors save the
last completed step (jitckpt's own checkpoint in ``output_dir/jitckpt``) and
write it as the Trainer's own ``output_dir/checkpoint-N`` too: weights
(``model.safetensors`` and ``config.json``, as ``save_pretrained`` writes them),
``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json`` of step N, and
each survivor's ``rng_state_R.pth``. The Trainer's resume reads exactly
these; it skips the batches of the steps done (``skip_first_batches``) and
restores the random-number state, so the resumed run loses at most the
step in flight. A failed rank's RNG file is missing: the Trainer then goes
on without it for that rank (not bitwise; the weights, optimizer, schedule
and data position are exact).

Where: the step boundary is ``on_step_end`` (after the optimizer step, the
scheduler step and ``global_step += 1``, before the Trainer's logging
collectives), so a survivor blocked in the next step's gradient all-reduce
holds a clean state. ``--inject`` counts the Trainer's global steps.
In-process recovery does not apply (the launcher says so and restarts).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

from jitckpt.checkpoint.jit_checkpoint import FrameworkResume, JitCheckpoint
from jitckpt.integrations.export import copied, export_directory, plain_rng, read_marker


class JitCheckpointCallback(TrainerCallback):  # type: ignore[misc]
    """JIT checkpointing for ``transformers.Trainer`` (module docstring).

    Args:
        run_dir: jitckpt's own run directory (event log, its checkpoints);
            default ``output_dir/jitckpt``.
        hang_timeout_s: see JitCheckpoint (default: 4 x the median step).
        stage_dir: see JitCheckpoint.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        hang_timeout_s: float | None = None,
        stage_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.hang_timeout_s = hang_timeout_s
        self.stage_dir = stage_dir
        self.ckpt: JitCheckpoint | None = None
        self._output_dir: Path | None = None
        self._state: Any = None  # the Trainer's TrainerState (live)
        self._model: Any = None

    # -- the Trainer's events ------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        self._output_dir = Path(args.output_dir)
        self._state, self._model = state, model
        # accelerate wraps the optimizer; its step() runs the torch
        # optimizer's, whose step hooks jitckpt uses.
        optimizer = getattr(optimizer, "optimizer", optimizer)
        step = int(state.global_step)
        resumed = None
        if step > 0:
            path = self._output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            marker = read_marker(path)
            resumed = FrameworkResume(
                step, str(path), marker.get("kind", "jit") if marker else "framework"
            )
        self.ckpt = JitCheckpoint(
            self.run_dir if self.run_dir is not None else self._output_dir / "jitckpt",
            model,
            optimizer,
            scheduler=kwargs.get("lr_scheduler"),
            hang_timeout_s=self.hang_timeout_s,
            stage_dir=self.stage_dir,
            on_saved=self._export,
            resumed_by_framework=resumed,
        )
        self._boundary(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._boundary(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.finish(int(state.global_step))

    def _boundary(self, state: Any) -> None:
        assert self.ckpt is not None
        self.ckpt.step_done(int(state.global_step))

    # -- the export ----------------------------------------------------------------------
    def _export(self, step: int, tree: Any, saved: Path) -> Path | None:
        """Write step ``step`` (the saved ``tree``) as ``checkpoint-{step}``."""
        assert self._output_dir is not None and self.ckpt is not None
        if tree.get("model") is None:
            return None  # a sharded save: the weights are in its DCP shards only
        rank, world_size = self.ckpt.rank, self.ckpt.world_size
        trainer_state = copy.deepcopy(self._state)
        trainer_state.global_step = step
        trainer_state.log_history = [
            entry for entry in trainer_state.log_history if entry.get("step", 0) <= step
        ]

        def write_shared(directory: Path) -> None:
            # What save_pretrained writes, by hand: it writes on rank 0 only,
            # and the survivor may be any rank. The Trainer loads the
            # weights non-strictly (a tied copy saved twice is harmless).
            save_file(copied(tree["model"]), str(directory / SAFE_WEIGHTS_NAME), {"format": "pt"})
            self._model.config.to_json_file(str(directory / CONFIG_NAME))
            torch.save(copied(tree["optimizer"]), directory / "optimizer.pt")
            if tree.get("scheduler") is not None:
                torch.save(tree["scheduler"], directory / "scheduler.pt")
            if tree.get("scaler") is not None:
                torch.save(copied(tree["scaler"]), directory / "scaler.pt")
            trainer_state.save_to_json(str(directory / "trainer_state.json"))

        def write_own(directory: Path) -> None:
            rng = tree.get("rng")
            if rng is None:  # deterministic mode reseeds instead
                return
            state = plain_rng(rng["state"])
            name = f"rng_state_{rank}.pth" if world_size > 1 else "rng_state.pth"
            torch.save(
                {"python": state["python"], "numpy": state["numpy"], "cpu": state["torch"]},
                directory / name,
            )

        return export_directory(
            self._output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}",
            rank,
            write_shared,
            write_own,
            {"kind": "jit", "step": step, "jitckpt_checkpoint": str(saved)},
        )
