"""A small CNN trained with plain DDP on synthetic images, plus jitckpt.

The shape of a typical vision script: an epoch loop over a plain DataLoader
with a DistributedSampler, convolutions with BatchNorm (buffers that
forward updates and DDP broadcasts from rank 0), dropout, SGD with
momentum, OneCycleLR and gradient clipping. The lines marked "# jitckpt"
are all that differ from examples/train_cnn_plain.py:

    jitckpt run --standalone --nproc-per-node 4 examples/train_cnn.py --run-dir runs/cnn

The plain `dist.init_process_group` stays: under `jitckpt run` it builds
jitckpt's group. --digest writes the SHA-256 of the final
model and optimizer state. The step logged is the scheduler's count, which
a resumed run restores with the rest of the state.

Each image is a pure function of (seed, index): a class-specific pattern of
stripes plus noise, so the network learns it within a few hundred steps.
"""

import argparse
import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import jitckpt  # jitckpt


class StripedImages(Dataset):
    """3x16x16 images of 10 classes: class c has stripes of period c + 2 at an
    angle of its own, plus noise; an item depends only on (seed, index)."""

    classes = 10

    def __init__(self, size: int, seed: int = 1234) -> None:
        self.size, self.seed = size, seed
        ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        self.patterns = torch.stack(
            [torch.sin((xs * (c % 3 + 1) + ys * (c // 3 + 1)) * 6.28 / (c + 2)) for c in range(10)]
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(0, self.classes, (1,), generator=gen))
        noise = torch.randn(3, 16, 16, generator=gen)
        image = self.patterns[label].expand(3, 16, 16) + 3.5 * noise
        return image, label


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def state_sha256(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 of the model's and the optimizer's state: every tensor's bytes
    and every other value, in key order (torch.save's bytes would also
    depend on which Python objects the state shares)."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8192, help="images in the data set")
    parser.add_argument("--run-dir", default="runs/cnn")
    parser.add_argument(
        "--digest", default=None, help="rank 0 writes the SHA-256 of the final state here"
    )
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    dataset = StripedImages(size=args.samples)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    model = DDP(SmallCNN())
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * len(loader), pct_start=0.25
    )

    ckpt = jitckpt.JitCheckpoint(args.run_dir, model, optimizer, scheduler=scheduler, loader=loader, deterministic=args.deterministic)  # jitckpt
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"CNN with {params / 1e3:.0f}k parameters, {dist.get_world_size()} ranks", flush=True)
    for epoch in ckpt.epochs(args.epochs):  # jitckpt
        sampler.set_epoch(epoch)
        model.train()
        for images, labels in ckpt.batches(loader):  # jitckpt
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=2.0)
            optimizer.step()
            scheduler.step()
            step = scheduler.last_epoch - 1
            if rank == 0 and (step % args.log_every == 0 or step == scheduler.total_steps - 1):
                print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
        if rank == 0:
            print(f"epoch {epoch} done", flush=True)

    if rank == 0 and args.digest:
        with open(args.digest, "w") as handle:
            handle.write(state_sha256(model, optimizer) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
