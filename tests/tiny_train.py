"""A tiny training script for tests of restore and bad input: one process
(or several under a launcher), a small MLP, manual saves at chosen steps."""

import argparse

import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import jitckpt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--save-at", type=int, action="append", default=[])
    parser.add_argument("--digest")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "MASTER_ADDR" in __import__("os").environ
    if distributed:
        jitckpt.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 1)
    )
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    loader = StatefulDataLoader(data, batch_size=4)
    ckpt = jitckpt.JitCheckpoint(args.run_dir, model, optimizer, loader=loader, deterministic=True)
    batches = iter(loader)
    print(f"start_step {ckpt.start_step}", flush=True)
    for step in ckpt.steps(args.steps):
        if step in args.save_at:
            ckpt.save()
        x, y = next(batches)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if args.digest:
        open(args.digest, "w").write(jitckpt.state_digest(model, optimizer))
    print("done", flush=True)


if __name__ == "__main__":
    main()
