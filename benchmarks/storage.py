"""Checkpoint storage speed, against the hardware bound, in one command.

    python benchmarks/storage.py            # 25M parameters + AdamW (~300 MB), ~1-2 min
    python benchmarks/storage.py --quick    # 2.5M parameters, a few seconds
    python benchmarks/storage.py --json out.json

What it measures, on one process (1 thread, like one rank):

* JIT save throughput: what a JIT save does on the failure path (lay out the
  live state as a jitckpt archive and write it with jitckpt's atomic,
  checksummed protocol: temp dir, fsync, rename, dir fsync), to host shared
  memory (staging, --shm-dir) and to disk (--disk-dir). Baseline: a plain
  copy of the same number of bytes from memory to a file in the same place
  (one write + fsync), the bound the hardware sets. Ratio = save throughput
  / plain-copy throughput. Goal: staged save >= 0.5.
* Periodic backstop blocking: the training loop's blocking time for one
  asynchronous periodic save (jitckpt.checkpoint.periodic.PeriodicSaver: copies made
  while the next forward and backward run, optimizer.step() waits for the
  copy), during a real training iteration of the model, against a
  synchronous torch.save of the same state to disk. Ratio = blocking /
  synchronous save time. Goal: <= 0.10. Also reported: the blocking if the
  update came right after the boundary (no forward/backward to hide the copy
  behind), which is the copy itself.

Every figure is the median of --repeats runs; baselines are measured in the
same process, interleaved with the measured operation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from harness import source_state

from jitckpt.checkpoint.periodic import PeriodicSaver
from jitckpt.events import EventLog
from jitckpt.state.training import TrainingState
from jitckpt.storage.directory import DirectoryStorage
from jitckpt.storage.manifest import Manifest


def build(width: int, layers: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optimizer, width)  # AdamW state exists from the first step on
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, width: int) -> None:
    batch = torch.randn(32, width)
    model(batch).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)


def manifest(step: int) -> Manifest:
    return Manifest(kind="jit", step=step, world_size=1, writer_rank=0, attempt=0)


def plain_copy(data: memoryview, directory: Path) -> float:
    path = directory / "plain.bin"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def jit_save(state: TrainingState, directory: Path, step: int) -> tuple[float, int]:
    storage = DirectoryStorage(directory / "checkpoints")
    started = time.perf_counter()
    payload = state.capture(step, 0, {})
    path = storage.write(manifest(step), payload)
    elapsed = time.perf_counter() - started
    shutil.rmtree(path)
    return elapsed, payload.size


def measure_saves(state: TrainingState, directory: Path, repeats: int) -> dict[str, Any]:
    size = state.capture(0, 0, {}).size
    data = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20) + bytearray(size % (1 << 20)))
    saves, plains = [], []
    for step in range(repeats):
        plains.append(plain_copy(data, directory))
        saves.append(jit_save(state, directory, step)[0])
    save_s, plain_s = statistics.median(saves), statistics.median(plains)
    return {
        "bytes": size,
        "jit_save_s": save_s,
        "plain_copy_s": plain_s,
        "jit_save_GBps": size / save_s / 1e9,
        "plain_copy_GBps": size / plain_s / 1e9,
        "ratio": plain_s / save_s,
    }


def measure_periodic(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    width: int,
    directory: Path,
    repeats: int,
) -> dict[str, Any]:
    state = TrainingState(model, optimizer)
    storage = DirectoryStorage(directory / "checkpoints")
    events = EventLog(directory, role="benchmark")
    saver = PeriodicSaver(storage, 1, None, lambda step: manifest(step), events, keep=1)
    blocked, copy_only, sync = [], [], []
    for step in range(1, repeats + 1):
        # Synchronous baseline: torch.save of the same state to the same disk.
        path = directory / "sync.pt"
        started = time.perf_counter()
        torch.save(state.tree(step, 0, {}), path)
        sync.append(time.perf_counter() - started)
        path.unlink()
        # One asynchronous save at a boundary, then a real iteration.
        started = time.perf_counter()
        saver.save(step, state.tree(step, 0, {}), state.updated_by_optimizer)
        in_save = time.perf_counter() - started
        batch = torch.randn(32, width)
        model(batch).square().mean().backward()
        saver.hold_update()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        blocked.append(saver._blocked_s)  # time in save() plus the wait before the update
        saver.wait()
        # Same, with the update right after the boundary: the whole copy blocks.
        saver.save(step, state.tree(step, 0, {}), state.updated_by_optimizer)
        saver.hold_update()
        copy_only.append(saver._blocked_s)
        saver.wait()
        del in_save
    blocked_s, sync_s = statistics.median(blocked), statistics.median(sync)
    return {
        "blocking_s": blocked_s,
        "blocking_without_overlap_s": statistics.median(copy_only),
        "sync_torch_save_s": sync_s,
        "ratio": blocked_s / sync_s,
        "ratio_without_overlap": statistics.median(copy_only) / sync_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2.5M parameters, 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shm-dir", default="/dev/shm", help="host shared memory (staging)")
    parser.add_argument(
        "--disk-dir", default=None, help="a directory on disk (default: a temp dir)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, layers = (1024, 2) if args.quick else (2048, 6)
    repeats = 2 if args.quick else args.repeats
    model, optimizer = build(width, layers)
    params = sum(p.numel() for p in model.parameters())
    state = TrainingState(model, optimizer)
    print(f"model: {params / 1e6:.1f}M parameters + AdamW state, {repeats} repeats", flush=True)
    results: dict[str, Any] = {
        "parameters": params,
        "repeats": repeats,
        "source": source_state(),
        "machine": f"{platform.node()} {os.cpu_count()} cpus, torch {torch.__version__}",
    }
    shm = Path(tempfile.mkdtemp(prefix="jitckpt-bench-", dir=args.shm_dir))
    disk = Path(tempfile.mkdtemp(prefix="jitckpt-bench-", dir=args.disk_dir))
    try:
        for name, directory in (("staged (shm)", shm), ("disk", disk)):
            row = measure_saves(state, directory, repeats)
            results[f"jit_save_{name.split()[0]}"] = row
            print(
                f"JIT save to {name:13s}: {row['bytes'] / 1e6:.0f} MB in {row['jit_save_s']:.3f} s "
                f"({row['jit_save_GBps']:.2f} GB/s); plain copy {row['plain_copy_s']:.3f} s "
                f"({row['plain_copy_GBps']:.2f} GB/s); ratio {row['ratio']:.2f}",
                flush=True,
            )
        row = measure_periodic(model, optimizer, width, disk, repeats)
        results["periodic"] = row
        print(
            f"periodic save blocking: {row['blocking_s'] * 1e3:.1f} ms vs synchronous torch.save "
            f"{row['sync_torch_save_s'] * 1e3:.0f} ms: ratio {row['ratio']:.3f} "
            f"(without a forward/backward to overlap: "
            f"{row['blocking_without_overlap_s'] * 1e3:.0f} ms, ratio "
            f"{row['ratio_without_overlap']:.2f})",
            flush=True,
        )
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    staged_ok = results["jit_save_staged"]["ratio"] >= 0.5
    periodic_ok = results["periodic"]["ratio"] <= 0.10
    results["goals"] = {"staged_ratio_ge_0.5": staged_ok, "periodic_ratio_le_0.10": periodic_ok}
    print(
        f"goals: staged save >= 0.5 of plain copy: {'met' if staged_ok else 'MISSED'}; "
        f"periodic blocking <= 0.10 of synchronous save: {'met' if periodic_ok else 'MISSED'}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
