"""A small GPT sharded with FSDP2 (or HSDP) on synthetic data, without jitckpt.

The same script as examples/train_gpt_fsdp.py minus its seven lines marked
"# jitckpt", each replaced by its plain-PyTorch equivalent:

    torchrun --standalone --nproc-per-node 4 examples/train_gpt_fsdp_plain.py --mesh replicate=2,shard=2

--run-dir and --deterministic are accepted so both scripts take the same
command line; they do nothing here. --digest writes the SHA-256 of the final
model and optimizer state, gathered whole (torch.save of both, not jitckpt's
digest format).

--mesh replicate=R,shard=S shards each replica over S ranks and replicates
over R groups (HSDP); shard=S alone is plain FSDP. A size of -1 is the world
size divided by the other, so replicate=-1,shard=2 also fits a job that
shrank or grew.

The model and data are those of the DDP example (examples/train_gpt_plain.py).
The data is learnable: each sequence follows a fixed random bigram table, so
the loss falls well below log(vocab) within a few hundred steps.
"""

import argparse
import hashlib
import io
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from train_gpt_plain import GPT, BigramSequences, endless


def parse_mesh(text: str, world: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """'replicate=R,shard=S' (or 'shard=S') -> mesh shape and dimension names."""
    sizes = dict(part.split("=") for part in text.split(","))
    names = tuple(name for name in ("replicate", "shard") if name in sizes)
    if not names or set(sizes) - set(names):
        raise SystemExit(f"--mesh {text!r}: expected replicate=R,shard=S or shard=S")
    shape = [int(sizes[name]) for name in names]
    if shape.count(-1) == 1:
        known = math.prod(n for n in shape if n != -1)
        shape[shape.index(-1)] = world // known if known else 0
    return tuple(shape), names


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
    parser.add_argument(
        "--mesh", default="shard=-1", help="replicate=R,shard=S (HSDP) or shard=S (FSDP)"
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="periodic backstop checkpoint every N steps (jitckpt only)",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    shape, names = parse_mesh(args.mesh, dist.get_world_size())
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)

    dataset = BigramSequences(vocab=256, length=64, size=4096)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = StatefulDataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers
    )
    model = GPT()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
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
            f"GPT with {params / 1e6:.2f}M parameters, mesh {dict(zip(names, shape, strict=True))}, {args.steps} steps",
            flush=True,
        )
    for step in range(args.steps):
        inputs, targets = next(batches)
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

    if args.digest:  # every rank: the digest gathers the shards
        full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        buffer = io.BytesIO()
        torch.save(full, buffer)
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        if rank == 0:
            with open(args.digest, "w") as handle:
                handle.write(digest + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
