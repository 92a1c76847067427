"""A tiny network trained with PyTorch Lightning (DDP, gloo, CPU) on
synthetic data, with jitckpt: the one line marked "# jitckpt" (and its
import) is the whole integration. The resume is Lightning's own usual one,
``trainer.fit(model, ckpt_path="last")`` with a ModelCheckpoint in a fixed
directory.

    jitckpt run --standalone --nproc-per-node 2 examples/train_lightning.py --output-dir runs/pl

The data is a pure function of the seed; Lightning adds the
DistributedSampler to the plain DataLoader itself. --digest writes the
SHA-256 of the final weights (rank 0), --steps the Trainer's max_steps.
"""

import argparse
import hashlib
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from jitckpt.integrations.lightning import JitCheckpointCallback  # jitckpt


class Regressor(pl.LightningModule):
    """A two-layer MLP fitting a fixed random linear map plus noise."""

    def __init__(self, features: int = 16, hidden: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def dataset(samples: int, features: int = 16, seed: int = 1234) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=gen)
    w = torch.randn(features, 1, generator=gen)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(samples, 1, generator=gen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/pl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digest", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, workers=True, verbose=False)

    model = Regressor()
    loader = DataLoader(dataset(args.samples), batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=args.steps,
        default_root_dir=args.output_dir,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            JitCheckpointCallback(),  # jitckpt
            ModelCheckpoint(dirpath=os.path.join(args.output_dir, "checkpoints"), save_last=True),
        ],
    )
    trainer.fit(model, loader, ckpt_path="last")
    if args.digest and trainer.is_global_zero:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
        with open(args.digest, "w") as handle:
            handle.write(digest.hexdigest() + "\n")


if __name__ == "__main__":
    main()
