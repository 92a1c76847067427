"""The baseline of benchmarks/recovery.py: the plain GPT loop with periodic checkpoints.

One rank of a plain torchrun job (no jitckpt), run by the benchmark as

    python -m torch.distributed.run --standalone --nproc-per-node 4 --max-restarts 3 \\
        benchmarks/periodic_baseline.py --steps N --run-dir DIR --save-every 20

It trains the model and data of examples/train_gpt_plain.py (imported from
the file, or from examples/train_gpt.py if the plain script is missing) with
the same optimizer, schedule and loader, and does what a job without JIT
checkpointing does to survive failures:

* after every ``--save-every`` completed steps it checkpoints model,
  optimizer, scheduler and loader state: with ``--checkpoint torch_save``
  (default) rank 0 alone torch.saves it, atomically (temporary file, fsync,
  rename, directory fsync); with ``--checkpoint dcp`` every rank calls
  ``torch.distributed.checkpoint.async_save`` (benchmarks/dcp_checkpoint.py);
* every rank resumes from the newest complete checkpoint on start;
* the process group is built over ``PrefixStore(f"attempt_{N}", TCPStore
  client)``: a plain ``init_process_group("gloo")`` fails on torchrun's
  restarts (docs/platform.md, "Restarts under torchrun share one store").

Nothing handles SIGTERM: a rank blocked in gloo dies of the signal's default
action, so torchrun's fixed 30 s SIGKILL grace never comes into play.

Every rank appends one JSON object per line to ``RUN_DIR/baseline.jsonl``
(``start`` with its pid and process creation time, ``fresh_start`` or
``restore``, ``step`` after every completed step, ``save``), each with a
wall-clock ``t``; the benchmark finds the pid to kill there and computes the
recovery from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from dcp_checkpoint import DcpCheckpointer

REPO = Path(__file__).resolve().parent.parent
# The plain script is the reference; the jitckpt one defines the same classes.
MODEL_SOURCES = (
    REPO / "examples" / "train_gpt_plain.py",
    REPO / "examples" / "train_gpt.py",
)
MODEL_NAMES = ("GPT", "BigramSequences", "endless")
LOG_FILE = "baseline.jsonl"
CHECKPOINT_PREFIX = "ckpt-"
# How long a worker waits to reach torchrun's store (already up when workers
# start, so this only bounds a misconfiguration).
STORE_CONNECT_TIMEOUT = timedelta(seconds=60)
# The example's hyperparameters (examples/train_gpt_plain.py defaults).
BATCH_SIZE = 16
LR = 3e-3
WARMUP_STEPS = 20


class WorkerLog:
    """JSON lines appended with one write each on an O_APPEND descriptor, so
    the four ranks never interleave within a line and a SIGKILLed rank keeps
    every line it wrote."""

    def __init__(self, run_dir: Path, log_file: str = LOG_FILE, **fields: Any) -> None:
        self.fields = fields
        self._fd = os.open(run_dir / log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: str, **data: Any) -> None:
        record = {"t": time.time(), "event": event, **self.fields, **data}
        os.write(self._fd, (json.dumps(record) + "\n").encode())


def start_log(run_dir: Path, log_file: str = LOG_FILE, **fields: Any) -> WorkerLog:
    """This worker's log in ``run_dir``, its first record (``start``) written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = WorkerLog(
        run_dir,
        log_file,
        **fields,
        attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        pid=os.getpid(),
    )
    log.emit("start", process_start=process_start_time())
    return log


def load_model_module() -> ModuleType:
    """The example's GPT, dataset and endless() from the first script that has them."""
    for path in MODEL_SOURCES:
        if not path.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"baseline_{path.stem}", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if all(hasattr(module, name) for name in MODEL_NAMES):
            return module
    raise ImportError(f"none of {[str(p) for p in MODEL_SOURCES]} defines {MODEL_NAMES}")


def process_start_time() -> float | None:
    """Wall-clock time this process was created (Linux), as jitckpt logs it."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return time.time() - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def lr_lambda(total: int) -> Callable[[int], float]:
    """The example's schedule: linear warmup, then cosine decay over ``total``."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / WARMUP_STEPS)
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return factor


def init_process_group() -> None:
    """gloo over a key space private to this torchrun attempt (docs/platform.md,
    "Restarts under torchrun share one store": the agent's store outlives restarts, and a second attempt's plain
    init_process_group finds the first attempt's keys and fails)."""
    import torch.distributed as dist

    client = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=STORE_CONNECT_TIMEOUT,
        wait_for_workers=False,
    )
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def checkpoint_path(run_dir: Path, completed: int) -> Path:
    return run_dir / f"{CHECKPOINT_PREFIX}{completed:09d}.pt"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most completed steps (names are zero padded)."""
    found = sorted(run_dir.glob(f"{CHECKPOINT_PREFIX}*.pt"))
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, completed: int, objects: dict[str, Any]) -> Path:
    """torch.save of every object's state, atomically: a reader sees the
    whole file or none (a rank killed mid-save leaves only a temporary)."""
    import torch

    state = {name: obj.state_dict() for name, obj in objects.items()}
    state["step"] = completed
    state["epoch"] = objects["loader"].sampler.epoch
    final = checkpoint_path(run_dir, completed)
    temporary = run_dir / f".tmp-{final.name}-{os.getpid()}"
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def restore_checkpoint(path: Path, objects: dict[str, Any]) -> int:
    """Load every object's state; returns the number of completed steps."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    # The sampler shuffles by its epoch but does not store it.
    objects["loader"].sampler.set_epoch(state["epoch"])
    for name, obj in objects.items():
        obj.load_state_dict(state[name])
    return int(state["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--save-every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument(
        "--checkpoint",
        choices=("torch_save", "dcp"),
        default="torch_save",
        help="torch_save: rank 0, synchronous; dcp: every rank, dcp.async_save",
    )
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.set_num_threads(1)
    init_process_group()
    rank = dist.get_rank()
    log = start_log(args.run_dir, rank=rank)
    example = load_model_module()
    torch.manual_seed(0)
    dataset = example.BigramSequences(vocab=256, length=64, size=4096)
    sampler: DistributedSampler[int] = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = StatefulDataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    model = DDP(example.GPT())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.steps))
    objects = {
        "model": model.module,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "loader": loader,
    }

    dcp_checkpointer = DcpCheckpointer(args.run_dir, objects) if args.checkpoint == "dcp" else None
    started = time.monotonic()
    path = dcp_checkpointer.newest() if dcp_checkpointer else newest_checkpoint(args.run_dir)
    start_step = 0
    if path is None:
        log.emit("fresh_start")
    elif dcp_checkpointer:
        start_step = dcp_checkpointer.restore(path)
        log.emit("restore", step=start_step, path=str(path), duration=time.monotonic() - started)
    else:
        start_step = restore_checkpoint(path, objects)
        log.emit("restore", step=start_step, path=str(path), duration=time.monotonic() - started)
    batches = example.endless(loader)

    for step in range(start_step, args.steps):
        inputs, targets = next(batches)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        log.emit("step", step=step)
        completed = step + 1
        if completed % args.save_every != 0 or completed >= args.steps:
            continue
        if dcp_checkpointer:
            blocked = dcp_checkpointer.save(completed)
            if rank == 0:  # duration: what the loop waited, the write goes on behind it
                log.emit("save", step=completed, duration=blocked, asynchronous=True)
        elif rank == 0:
            began = time.monotonic()
            saved = save_checkpoint(args.run_dir, completed, objects)
            log.emit("save", step=completed, path=str(saved), duration=time.monotonic() - began)
    if dcp_checkpointer:
        dcp_checkpointer.wait()
    log.emit("finish", step=args.steps)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
