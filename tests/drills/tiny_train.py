"""A tiny training script for tests of restore, bad input and elasticity:
one process (or several under a launcher), a small MLP, manual saves at
chosen steps, and optionally a log of the samples each rank trained on."""

import argparse
import json
import os
import signal
import time

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

import jitckpt


class Indexed(Dataset):
    """Sample i is (i, features_i, target_i), a pure function of i."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int):
        gen = torch.Generator().manual_seed(index)
        return index, torch.randn(8, generator=gen), torch.randn(1, generator=gen)


def endless(loader):
    while True:
        yield from loader
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(loader.sampler.epoch + 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--save-at", type=int, action="append", default=[])
    parser.add_argument("--digest")
    parser.add_argument(
        "--break-at", type=int, default=None, help="leave the loop early at this step"
    )
    parser.add_argument(
        "--sleep-after", type=float, default=0.0, help="seconds of non-step work after the loop"
    )
    parser.add_argument(
        "--log-samples",
        action="store_true",
        help="append each step's sample indices to RUN_DIR/samples.jsonl",
    )
    parser.add_argument(
        "--log-loss",
        action="store_true",
        help="average the loss over ranks with ckpt.all_reduce each step (a user collective) "
        "and append it to RUN_DIR/losses.jsonl",
    )
    parser.add_argument(
        "--die-at",
        type=int,
        nargs=2,
        metavar=("STEP", "RANK"),
        help="SIGKILL rank RANK at the start of step STEP every time it gets there (a "
        "persistent fault, unlike --inject, which fires once per run directory)",
    )
    parser.add_argument(
        "--plain-loss-all-reduce",
        action="store_true",
        help="average the loss over ranks with a plain torch.distributed.all_reduce after the "
        "optimizer step (a collective no recovery notice reaches)",
    )
    parser.add_argument(
        "--crash-after-loop",
        type=int,
        metavar="RANK",
        help="rank RANK aborts (SIGABRT) after its training loop completed",
    )
    parser.add_argument(
        "--stall-replacement",
        action="store_true",
        help="a fresh replacement for a dead rank sleeps forever before its setup",
    )
    args = parser.parse_args()
    if args.stall_replacement and os.environ.get("JITCKPT_ROLE") == "replacement":
        while True:
            time.sleep(3600)
    torch.set_num_threads(1)
    distributed = "MASTER_ADDR" in os.environ
    if distributed:
        jitckpt.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 1)
    )
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
        sampler = jitckpt.ElasticDistributedSampler(Indexed(), shuffle=True, seed=0)
    else:
        sampler = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = StatefulDataLoader(Indexed(), batch_size=args.batch_size, sampler=sampler)
    ckpt = jitckpt.JitCheckpoint(args.run_dir, model, optimizer, loader=loader, deterministic=True)
    batches = endless(loader)
    print(f"start_step {ckpt.start_step}", flush=True)
    rank = int(os.environ.get("RANK", "0"))
    for step in ckpt.steps(args.steps):
        if step == args.break_at:
            break
        if step in args.save_at:
            ckpt.save()
        if args.die_at and (step, rank) == tuple(args.die_at):
            os.kill(os.getpid(), signal.SIGKILL)
        index, x, y = next(batches)
        if args.log_samples:
            record = {
                "rank": rank,
                "attempt": ckpt.attempt,
                "step": step,
                "world": ckpt.world_size,
                "indices": index.tolist(),
            }
            with open(os.path.join(args.run_dir, "samples.jsonl"), "a") as handle:
                handle.write(json.dumps(record) + "\n")
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.plain_loss_all_reduce:
            torch.distributed.all_reduce(loss.detach())
        if args.log_loss:
            average = loss.detach() / ckpt.world_size
            reduced = ckpt.all_reduce(average)
            record = {"rank": rank, "step": step, "loss": average.item(), "reduced": reduced}
            with open(os.path.join(args.run_dir, "losses.jsonl"), "a") as handle:
                handle.write(json.dumps(record) + "\n")
    time.sleep(args.sleep_after)
    if args.crash_after_loop == rank:
        os.abort()
    if args.digest and rank == 0:
        with open(args.digest, "w") as handle:
            handle.write(jitckpt.state_digest(model, optimizer))
    print("done", flush=True)


if __name__ == "__main__":
    main()
