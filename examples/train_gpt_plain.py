"""A small GPT trained with plain DDP on synthetic data, without jitckpt.

The same script as examples/train_gpt.py minus its five lines marked
"# jitckpt", each replaced by its plain-PyTorch equivalent:

    torchrun --standalone --nproc-per-node 4 examples/train_gpt_plain.py

--run-dir and --deterministic are accepted so both scripts take the same
command line; they do nothing here. --digest writes the SHA-256 of the final
model and optimizer state (torch.save of both, not jitckpt's digest format).

The data is learnable: each sequence follows a fixed random bigram table, so
the loss falls well below log(vocab) within a few hundred steps.
"""

import argparse
import hashlib
import io
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class BigramSequences(Dataset):
    """Token sequences drawn from a fixed random bigram table. Each item is a
    pure function of (seed, index), so workers and resumes see the same data."""

    def __init__(self, vocab: int, length: int, size: int, seed: int = 1234) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.next_token = torch.randint(0, vocab, (vocab, 4), generator=gen)
        self.vocab, self.length, self.size, self.seed = vocab, length, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        choices = torch.randint(0, 4, (self.length,), generator=gen)
        tokens = [int(torch.randint(0, self.vocab, (1,), generator=gen))]
        for choice in choices.tolist():
            tokens.append(int(self.next_token[tokens[-1], choice]))
        seq = torch.tensor(tokens)
        return seq[:-1], seq[1:]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(1)
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=256, dim=128, layers=4, heads=4, context=64, dropout=0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos[:, : idx.size(1)])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def endless(loader):
    """Batches across epochs; the epoch lives in the sampler."""
    while True:
        yield from loader
        loader.sampler.set_epoch(loader.sampler.epoch + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run-dir", default="runs/gpt")
    parser.add_argument(
        "--digest", default=None, help="rank 0 writes the SHA-256 of the final state here"
    )
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU per rank, NCCL")
    parser.add_argument("--save-every", type=int, default=None, help="periodic backstop checkpoint every N steps (jitckpt only)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    dataset = BigramSequences(vocab=256, length=64, size=4096)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = StatefulDataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers
    )
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model = DDP(GPT().to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup = 20
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    batches = endless(loader)

    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(
            f"GPT with {params / 1e6:.2f}M parameters, {dist.get_world_size()} ranks, {args.steps} steps",
            flush=True,
        )
    for step in range(args.steps):
        inputs, targets = (tensor.to(device) for tensor in next(batches))
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(
                f"step {step:5d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}",
                flush=True,
            )

    if rank == 0 and args.digest:
        with open(args.digest, "w") as handle:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
            handle.write(hashlib.sha256(buffer.getvalue()).hexdigest() + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
