"""jitckpt.integrations.torchtitan writes a JIT save as torchtitan's own
``step-N``, and torchtitan's own CheckpointManager resumes it.

torchtitan's real components (CheckpointManager, OptimizersContainer,
LRSchedulersContainer, ParallelAwareDataloader) on a small model in one
process, without torch.distributed; the whole failure path (FSDP2 under
``jitckpt run``, a rank killed, torchtitan's resume) is the drill
tests/drills/test_torchtitan_resume.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn

pytest.importorskip(
    "torchtitan.components.checkpoint",
    reason="torchtitan (0.3, --no-deps, with tyro, einops, spmd_types) is not installed",
)
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402
from torch.utils.data import IterableDataset  # noqa: E402
from torchtitan.components.checkpoint import CheckpointManager  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.optimizer import (  # noqa: E402
    LRSchedulersContainer,
    OptimizersContainer,
)
from torchtitan.components.optimizer.optimizer import ParamGroupConfig  # noqa: E402

from jitckpt.errors import UsageError  # noqa: E402
from jitckpt.integrations.export import MARKER, read_marker  # noqa: E402
from jitckpt.integrations.torchtitan import (  # noqa: E402
    ExportError,
    check_trainer,
    every_dp_rank,
    torchtitan_state,
    write_step,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Tokens(IterableDataset):  # type: ignore[type-arg]
    """An endless stream whose state is its position and a leftover buffer,
    like torchtitan's text datasets."""

    def __init__(self) -> None:
        self.position, self.buffer = 0, [0.0]

    def __iter__(self) -> Any:
        while True:
            self.position += 1
            self.buffer = [float(self.position)]
            yield torch.full((4,), float(self.position)), torch.tensor([float(self.position)])

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.buffer = state["position"], list(state["buffer"])


class TrainState:
    """The Trainer's own entry (``states={"train_state": trainer}``)."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


class Run:
    """What a torchtitan Trainer builds, small, and its training step in
    Trainer.train_step's order."""

    def __init__(self, dump_folder: Path, *, dp_rank: int = 0, dp_world_size: int = 1) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizers = OptimizersContainer.Config(
            param_groups=[
                ParamGroupConfig(
                    pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.01}
                )
            ],
            implementation="for-loop",
        ).build(model_parts=[self.model])
        self.lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
            optimizers=self.optimizers, training_steps=10
        )
        self.dataloader = ParallelAwareDataloader(
            Tokens(), dp_rank=dp_rank, dp_world_size=dp_world_size, batch_size=2
        )
        self.train_state = TrainState()
        self.checkpointer = CheckpointManager.Config(
            enable=True, folder="checkpoint", interval=2, keep_latest_k=0
        ).build(
            dataloader=self.dataloader,
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=None,
            base_folder=str(dump_folder),
        )
        self._batches: Any = None

    @property
    def batches(self) -> Any:
        """The loader's iterator, made at the first batch (after a load, as
        Trainer.train makes it)."""
        if self._batches is None:
            self._batches = iter(self.dataloader)
        return self._batches

    def train_step(self) -> torch.Tensor:
        self.train_state.step += 1
        inputs, labels = next(self.batches)
        self.train_state.ntokens_seen += labels.numel()
        nn.functional.mse_loss(self.model(inputs), labels).backward()
        self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        return labels

    def boundary(self) -> dict[str, Any]:
        """What jitckpt keeps at a step boundary: the loader's state and
        the train state (they move during the next step)."""
        return {"data": self.dataloader.state_dict(), "train": self.train_state.state_dict()}

    def tensors(self) -> dict[str, torch.Tensor]:
        state = {**self.model.state_dict(), **self.optimizers.state_dict()}
        return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


def export(run: Run, step: int, boundary: dict[str, Any]) -> Path | None:
    return write_step(
        run.checkpointer.folder,
        step,
        run.checkpointer.states,
        dataloader_state=boundary["data"],
        train_state=boundary["train"],
    )


def layout(directory: Path) -> dict[str, Any]:
    """DCP's entries of a checkpoint: name -> (kind, shape, dtype)."""
    entries = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {
        name: (
            type(meta).__name__,
            tuple(getattr(meta, "size", ())),
            str(getattr(getattr(meta, "properties", None), "dtype", "")),
        )
        for name, meta in entries.items()
    }


def test_step_n_has_exactly_the_entries_torchtitan_saves(tmp_path: Path) -> None:
    run = Run(tmp_path)
    for _ in range(3):
        run.train_step()
        run.checkpointer.save(run.train_state.step)  # torchtitan's own: step 2 (interval 2)
    folder = Path(run.checkpointer.folder)
    assert export(run, 3, run.boundary()) == folder / "step-3"
    own, ours = layout(folder / "step-2"), layout(folder / "step-3")
    assert ours == own
    assert "optimizer.state.0.weight.exp_avg" in ours and "train_state.step" in ours
    assert "dataloader.dp_rank_0" in ours and "lr_scheduler.last_epoch" in ours
    assert read_marker(folder / "step-3") == {
        "kind": "jit",
        "step": 3,
        "dataloader_copied_for": [],
        "writer_rank": 0,
        "jitckpt_version": read_marker(folder / "step-3")["jitckpt_version"],  # type: ignore[index]
    }
    assert not (folder / "step-2" / MARKER).exists()


def test_torchtitans_own_resume_loads_the_exported_step(tmp_path: Path) -> None:
    run = Run(tmp_path)
    for _ in range(5):
        run.train_step()
        if run.train_state.step in (2, 4):
            run.checkpointer.save(run.train_state.step)  # torchtitan's own saves
    saved, boundary = run.tensors(), run.boundary()  # step 5 is complete
    # Step 6 fails before its optimizer step: its batch is drawn and counted,
    # its gradients computed; the model and optimizer are still step 5's.
    run.train_state.step += 1
    inputs, following = next(run.batches)
    run.train_state.ntokens_seen += following.numel()
    nn.functional.mse_loss(run.model(inputs), following).backward()
    assert export(run, 5, boundary) == Path(run.checkpointer.folder) / "step-5"

    resumed = Run(tmp_path)  # the restart: everything built anew
    assert resumed.checkpointer.load(step=-1) is True  # the newest: step-5, not step-4
    assert resumed.train_state.state_dict() == {"step": 5, "ntokens_seen": 5 * 2}
    assert resumed.lr_schedulers.schedulers[0].last_epoch == 5
    assert (
        resumed.lr_schedulers.schedulers[0].get_last_lr()
        == run.lr_schedulers.schedulers[0].get_last_lr()
    )
    now = resumed.tensors()
    assert now.keys() == saved.keys()
    for name in saved:
        assert torch.equal(now[name], saved[name]), name
    assert torch.equal(next(resumed.batches)[1], following)  # step 6's batch again


def test_a_step_torchtitan_wrote_is_never_overwritten_and_step_0_is_not_exported(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path)
    assert export(run, 0, run.boundary()) is None
    for _ in range(2):
        run.train_step()
    run.checkpointer.save(2)
    folder = Path(run.checkpointer.folder)
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "step-2").iterdir()}
    run.train_step()
    assert export(run, 2, run.boundary()) is None
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "step-2").iterdir()} == before
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]  # no temporary left


def test_a_leftover_temporary_directory_is_no_checkpoint_to_torchtitan(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.train_step()
    written = export(run, 1, run.boundary())
    assert written is not None
    # A survivor that died between writing and renaming leaves this behind.
    written.rename(written.parent / ".jitckpt-tmp-7-0-12345")
    assert run.checkpointer._find_load_step() == -1
    assert Run(tmp_path).checkpointer.load() is False


def test_every_dp_rank_gets_a_loader_entry_and_the_copies_are_marked(tmp_path: Path) -> None:
    state, copied = every_dp_rank({"dp_rank_1": b"one", "world_size": 3})
    assert state == {"dp_rank_0": b"one", "dp_rank_1": b"one", "dp_rank_2": b"one", "world_size": 3}
    assert copied == [0, 2]
    assert every_dp_rank({"custom": 1}) == ({"custom": 1}, [])

    run = Run(tmp_path, dp_rank=0, dp_world_size=2)
    for _ in range(2):
        run.train_step()
    written = export(run, 2, run.boundary())
    assert written is not None
    assert read_marker(written)["dataloader_copied_for"] == [1]  # type: ignore[index]
    other = Run(tmp_path, dp_rank=1, dp_world_size=2)
    assert other.checkpointer.load() is True
    # Rank 1 continues from rank 0's position (its own stream there).
    assert next(other.batches)[1].flatten().tolist() == [5.0, 6.0]


def test_a_tensor_split_across_ranks_is_refused() -> None:
    class Sharded:
        def state_dict(self) -> dict[str, Any]:
            whole = torch.zeros(4)
            whole._local_tensor = torch.zeros(2)  # type: ignore[attr-defined]
            return {"weight": whole}

    with pytest.raises(ExportError, match="'weight' is sharded"):
        torchtitan_state({"model": Sharded()})


def test_attach_refuses_what_one_process_cannot_export(tmp_path: Path) -> None:
    run = Run(tmp_path)

    def trainer(**changes: Any) -> SimpleNamespace:
        parts = {"checkpointer": run.checkpointer, "model_parts": [run.model]}
        return SimpleNamespace(**{**parts, "optimizers": run.optimizers, **changes})

    check_trainer(trainer())
    disabled = CheckpointManager.Config(enable=False).build(
        dataloader=None,
        model_parts=[run.model],
        optimizers=run.optimizers,
        lr_schedulers=run.lr_schedulers,
        states={},
        sd_adapter=None,
    )
    with pytest.raises(UsageError, match="--checkpoint.enable"):
        check_trainer(trainer(checkpointer=disabled))
    with pytest.raises(UsageError, match="one model part"):
        check_trainer(trainer(model_parts=[run.model, run.model]))
    with pytest.raises(UsageError, match="one optimizer per model part"):
        check_trainer(trainer(optimizers=SimpleNamespace(optimizers=[object(), object()])))
