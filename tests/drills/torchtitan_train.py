"""A stand-in for torchtitan's Trainer, for the drills of
jitckpt.integrations.torchtitan on CPU: torchtitan 0.3's own Trainer needs
CUDA (its device type falls back to "cuda"), triton (imported by its models)
and tensorboard, none of which this machine has.

What is torchtitan's own here: the CheckpointManager (save, purge, load,
``states={"train_state": trainer}``), the OptimizersContainer (AdamW by a
param-group config), the LRSchedulersContainer (warmup + linear decay) and
the ParallelAwareDataloader. What stands in: the model (a small MLP under
``fully_shard`` on torchtitan's mesh names, ``dp_replicate`` x ``fsdp`` of
1, as torchtitan applies it), the data (token counts, a pure function of
the dp rank and the position), and ``train()``/``train_step()``, which
follow Trainer.train's order: load, then per step ``step += 1``, data,
forward, backward, ``optimizers.step()``, ``lr_schedulers.step()``, a
metrics all-reduce, ``checkpointer.save(step, last_step=...)``.

The one line marked "# jitckpt" is the integration. --digest writes the
SHA-256 of the final model, optimizer and train state (rank 0).
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import IterableDataset
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer
from torchtitan.components.optimizer.optimizer import ParamGroupConfig

from jitckpt.integrations.torchtitan import attach  # jitckpt


class Tokens(IterableDataset):  # type: ignore[type-arg]
    """Endless (inputs, labels) of one dp rank; the state is the position."""

    def __init__(self, dp_rank: int) -> None:
        self.dp_rank, self.position = dp_rank, 0

    def __iter__(self) -> Any:
        while True:
            gen = torch.Generator().manual_seed(self.dp_rank * 1_000_003 + self.position)
            self.position += 1
            inputs = torch.randn(16, generator=gen)
            yield inputs, inputs[:4].sum().reshape(1)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class Trainer(torch.distributed.checkpoint.stateful.Stateful):
    def __init__(self, args: argparse.Namespace) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if world > 1:
            mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp_replicate", "fsdp"))
        else:
            mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("fsdp",))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        fully_shard(model, mesh=mesh)
        self.model_parts = [model]
        self.optimizers = OptimizersContainer.Config(
            param_groups=[
                ParamGroupConfig(
                    pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.01}
                )
            ],
            implementation="for-loop",
        ).build(model_parts=self.model_parts)
        self.lr_schedulers = LRSchedulersContainer.Config(warmup_steps=5).build(
            optimizers=self.optimizers, training_steps=args.steps
        )
        self.dataloader = ParallelAwareDataloader(
            Tokens(rank), dp_rank=rank, dp_world_size=world, batch_size=4
        )
        self.steps = args.steps
        self.step = 0
        self.ntokens_seen = 0
        self.checkpointer = CheckpointManager.Config(
            enable=True, folder="checkpoint", interval=args.interval, keep_latest_k=3
        ).build(
            dataloader=self.dataloader,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self},
            sd_adapter=None,
            base_folder=args.dump_folder,
        )

    def train(self) -> None:
        self.checkpointer.load(step=-1)
        if dist.get_rank() == 0:
            print(f"Training starts at step {self.step + 1}", flush=True)
        data = iter(self.dataloader)
        while self.step < self.steps:
            self.step += 1
            self.train_step(data)
            self.checkpointer.save(self.step, last_step=self.step == self.steps)

    def train_step(self, data: Any) -> None:
        inputs, labels = next(data)
        self.ntokens_seen += labels.numel()
        loss = nn.functional.mse_loss(self.model_parts[0](inputs), labels)
        loss.backward()
        self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        # torchtitan's metrics: a collective after the optimizer and scheduler steps.
        dist.all_reduce(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]


def digest(trainer: Trainer) -> str:
    """SHA-256 of the whole model, optimizer state and train state (a
    collective: the DTensors are gathered)."""
    sha = hashlib.sha256()
    state = {**trainer.model_parts[0].state_dict(), **trainer.optimizers.state_dict()}
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.Tensor):
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            sha.update(key.encode() + full.detach().double().numpy().tobytes())
    sha.update(repr(sorted(trainer.state_dict().items())).encode())
    return sha.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-folder", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--digest", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    trainer = Trainer(args)
    attach(trainer)  # jitckpt
    trainer.train()
    final = digest(trainer)
    if args.digest and dist.get_rank() == 0:
        with open(args.digest, "w") as handle:
            handle.write(final + "\n")
    trainer.checkpointer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
