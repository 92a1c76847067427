"""Step-time overhead of jitckpt on the example GPT, in one command.

    python benchmarks/overhead.py              # 4 ranks, about 2.5-3 minutes on 2 cores
    python benchmarks/overhead.py --quick      # smoke run, about 25 s
    python benchmarks/overhead.py --json out.json
    python benchmarks/overhead.py --modes bare,jitckpt,torch_save,dcp_async,jitckpt_periodic

What it measures: the steady-state wall time of one training iteration of
examples/train_gpt.py (GPT of 0.87M parameters, DDP over gloo, AdamW,
LambdaLR, StatefulDataLoader, batch 16) with jitckpt ("jitckpt":
``JitCheckpoint(run_dir, model, optimizer, scheduler=..., loader=...)`` with
its defaults, so deterministic=False, and the loop ``for step in
ckpt.steps(total)``) and without it ("bare": ``for step in range(total)``).

How: one ``torchrun --standalone`` job of --nproc ranks runs this file again
with --worker. In every round each worker builds a fresh copy of the
training setup (model, DDP, optimizer, scheduler, loader) per mode and runs
--warmup untimed then --steps timed iterations with it; bare goes first in
even rounds, jitckpt in odd ones, so both modes see the same machine. Fresh
copies keep the modes apart: a DDP model takes one comm hook only,
JitCheckpoint's hooks stay on its own model and optimizer, and its side
threads (watchdog, heartbeat) end with its ``steps()`` loop, so a bare round
never runs with any of them. Rank 0 times every iteration with
time.perf_counter (and the process's CPU time, all threads); an iteration's
time includes advancing the step iterator, where jitckpt does its
step-boundary work.

Periodic checkpoint modes (``--modes``; each saves after every
--save-every completed steps, the same interval for all): ``torch_save``
(rank 0 torch.saves model, optimizer, scheduler and loader state
synchronously and atomically, as benchmarks/periodic_baseline.py does),
``dcp_async`` (every rank calls ``torch.distributed.checkpoint.async_save``,
benchmarks/dcp_checkpoint.py) and ``jitckpt_periodic`` (jitckpt's periodic
backstop, ``JitCheckpoint(..., save_every=N)``). For them the loop's
blocking per checkpoint is timed directly (rank 0: the save call, for DCP
including the wait for the previous save; for jitckpt the ``blocked_s`` of
its ``save`` events), and the mean step time, which spreads the saves over
the interval, is compared with bare's.

In-process recovery modes (``--modes``): ``jitckpt_inprocess`` is
``jitckpt`` as ``jitckpt run`` configures it on one node, with in-process
recovery on: jitckpt then does DDP's gradient reduction itself
(jitckpt.comm.ChunkedAllreduce, so that a recovery can wake the survivors)
instead of DDP's built-in C++ all-reduce; ``jitckpt_deterministic`` adds
deterministic mode (reseeding at every boundary and forward). Goal for
``jitckpt_inprocess``: the same 1%; deterministic mode's cost is reported.

How to read it: each round's line gives the median step time of both modes
and their ratio; the spread of that ratio over rounds is the noise. The
headline is the median of the per-round ratios, with the standard error of
their mean as its resolution; the ratio of the medians over all timed steps
and of the median CPU times per step are given beside it. Goal: ratio <= 1.01
at 4 ranks (jitckpt costs at most 1% of a step). 4 ranks on 2 cores take
about 0.29 s per step of this model, and one round's ratio scatters by 5-10%
on a quiet machine, so a default run resolves about +-2-4%: a ratio within
that of 1.0 says the overhead is below what this machine can measure, not
that it is below 1%. CPU time is no cleaner: with 4 ranks on 2 cores each
rank's CPU time per step grows with the wall time (about half of it) and
with any other work sharing the cores. Other work on the machine (see the
load average printed at the end) makes every number noisier; a burst during
one round shows up as one outlying ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import source_state, standalone_launch
from overhead_report import report, summarize

from jitckpt import events as ev
from jitckpt.protocol import INPROCESS_ENV

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_gpt.py"
MODES = ("bare", "jitckpt")
# Periodic checkpoint modes, also against bare (see the module docstring).
SAVE_MODES = ("torch_save", "dcp_async", "jitckpt_periodic")
# jitckpt as `jitckpt run` configures it with in-process recovery on (the
# default on one node): jitckpt does DDP's gradient reduction itself, in the
# default mode and in deterministic mode (see the module docstring).
RECOVERY_MODES = ("jitckpt_inprocess", "jitckpt_deterministic")
ALL_MODES = MODES + SAVE_MODES + RECOVERY_MODES
DEFAULT_SAVE_EVERY = 10
# Defaults sized for 4 ranks on 2 cores, where a step of the example takes
# about 0.29 s: 2 modes x 8 rounds x (3 + 27) steps is about 140 s of
# training, plus about 10 s to launch and 1 s per round to build the setups.
DEFAULT_STEPS, DEFAULT_WARMUP, DEFAULT_ROUNDS = 27, 3, 8
# --quick: 2 modes x 2 rounds x (2 + 8) steps, about 25 s in all.
QUICK_STEPS, QUICK_WARMUP, QUICK_ROUNDS = 8, 2, 2
# Wall-clock bound of the whole torchrun job; a hung job is killed after it.
DEFAULT_TIMEOUT_S = 600.0
# How long torchrun gets to stop its workers after SIGTERM before everything
# left in its process group is killed (its own worker shutdown waits 30 s).
STOP_GRACE_S = 10.0
BATCH_SIZE = 16
LR = 3e-3


# -- worker (one rank of the torchrun job) ------------------------------------------
@dataclass
class Setup:
    """One mode's copy of the example's training objects for one round."""

    model: Any  # DistributedDataParallel
    optimizer: Any
    scheduler: Any
    batches: Iterator[Any]
    step_iter: Iterator[int]
    # Called after every completed step with the count of completed steps;
    # returns the seconds a checkpoint blocked the loop, None if none was due.
    after_step: Callable[[int], float | None] = lambda completed: None


def load_example() -> ModuleType:
    """Import examples/train_gpt.py (not a package) for its GPT and dataset."""
    spec = importlib.util.spec_from_file_location("train_gpt_example", EXAMPLE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {EXAMPLE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lr_lambda(total: int, warmup: int = 20) -> Callable[[int], float]:
    """The example's schedule: linear warmup, then cosine decay over ``total``."""

    def factor(step: int) -> float:
        return (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )

    return factor


def build_setup(
    example: ModuleType, mode: str, total: int, run_dir: Path, save_every: int
) -> Setup:
    """The example's training objects, wrapped in JitCheckpoint in jitckpt mode.

    Built afresh for every mode and round: JitCheckpoint registers hooks on
    the optimizer and the model, a DDP model takes one comm hook only, and
    the side threads a JitCheckpoint starts end when its steps() loop ends,
    so a bare round never runs with any of jitckpt's hooks or threads."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    import jitckpt

    torch.manual_seed(0)
    dataset = example.BigramSequences(vocab=256, length=64, size=4096)
    sampler: DistributedSampler[int] = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = StatefulDataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
    model = DDP(example.GPT())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total))
    batches = example.endless(loader)
    step_iter: Iterator[int]
    if mode.startswith("jitckpt"):
        every = save_every if mode == "jitckpt_periodic" else None
        # What `jitckpt run` sets when in-process recovery is on.
        if mode in RECOVERY_MODES:
            os.environ[INPROCESS_ENV] = "1"
        else:
            os.environ.pop(INPROCESS_ENV, None)
        ckpt = jitckpt.JitCheckpoint(
            run_dir,
            model,
            optimizer,
            scheduler=scheduler,
            loader=loader,
            save_every=every,
            deterministic=mode == "jitckpt_deterministic",
        )
        step_iter = ckpt.steps(total)
    else:
        step_iter = iter(range(total))
    setup = Setup(model, optimizer, scheduler, batches, step_iter)
    objects = {"model": model.module, "optimizer": optimizer, "scheduler": scheduler}
    objects["loader"] = loader
    if mode in ("torch_save", "dcp_async"):
        setup.after_step = periodic_saver(mode, run_dir, objects, save_every)
    return setup


def periodic_saver(
    mode: str, run_dir: Path, objects: dict[str, Any], save_every: int
) -> Callable[[int], float | None]:
    """The after-step hook of a baseline checkpoint mode: torch.save on rank 0
    (periodic_baseline.save_checkpoint) or dcp.async_save on every rank."""
    import torch.distributed as dist
    from dcp_checkpoint import DcpCheckpointer
    from periodic_baseline import save_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = DcpCheckpointer(run_dir, objects) if mode == "dcp_async" else None
    rank = dist.get_rank()

    def after_step(completed: int) -> float | None:
        if completed % save_every:
            return None
        if checkpointer is not None:
            return checkpointer.save(completed)
        if rank != 0:
            return None
        started = time.perf_counter()
        save_checkpoint(run_dir, completed, objects)
        return time.perf_counter() - started

    return after_step


def jitckpt_blocking(run_dir: Path) -> list[float]:
    """The loop's blocking per periodic save of jitckpt's backstop (its events)."""
    from jitckpt.events import read_events

    return [
        e["blocked_s"]
        for e in read_events(run_dir)
        if e.get("event") == ev.SAVE and e.get("kind") == "periodic"
    ]


def run_loop(setup: Setup) -> tuple[list[float], list[float], list[float]]:
    """Run the example's loop to the end. Returns the wall time and the CPU
    time of this process (all its threads) of every iteration, in seconds,
    and the blocking time of every checkpoint the after-step hook took.

    An iteration spans from the previous iteration's end to its own, so it
    includes advancing the step iterator (jitckpt's step boundary). The final
    advance that ends the loop (jitckpt's last boundary, stopping its side
    threads) is not a training step and is not timed."""
    import torch.nn.functional as F

    wall: list[float] = []
    cpu: list[float] = []
    blocked: list[float] = []
    last_wall, last_cpu = time.perf_counter(), time.process_time()
    for _ in setup.step_iter:
        inputs, targets = next(setup.batches)
        logits = setup.model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        saved = setup.after_step(len(wall) + 1)
        if saved is not None:
            blocked.append(saved)
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        wall.append(now_wall - last_wall)
        cpu.append(now_cpu - last_cpu)
        last_wall, last_cpu = now_wall, now_cpu
    return wall, cpu, blocked


def die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when torchrun's agent dies.

    torchrun starts every worker in a session of its own, so killing the
    agent's process group (what the benchmark does on timeout or Ctrl-C)
    would leave the workers running."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:  # the agent died before prctl took effect
        os._exit(1)


def worker(args: argparse.Namespace) -> None:
    die_with_parent()
    # torchdata 0.11 warns once per loader about a deprecated torch call.
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    import torch
    import torch.distributed as dist

    import jitckpt

    torch.set_num_threads(1)
    jitckpt.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    example = load_example()
    total = args.warmup + args.steps
    run_root = Path(args.run_root)
    params = sum(p.numel() for p in example.GPT().parameters())

    rounds: list[dict[str, Any]] = []
    for index in range(args.rounds):
        # Rotate the order so that every mode runs in every position.
        shift = index % len(args.modes)
        order = args.modes[shift:] + args.modes[:shift]
        record: dict[str, Any] = {"order": list(order)}
        for mode in order:
            run_dir = run_root / f"{mode}-{index}"
            setup = build_setup(example, mode, total, run_dir, args.save_every)
            gc.collect()
            dist.barrier()
            wall, cpu, blocked = run_loop(setup)
            record[mode], record[f"{mode}_cpu"] = wall[args.warmup :], cpu[args.warmup :]
            if mode == "jitckpt_periodic" and rank == 0:
                blocked = jitckpt_blocking(run_dir)
            record[f"{mode}_blocked"] = blocked
            del setup
        rounds.append(record)
        if rank == 0:
            medians = {mode: statistics.median(record[mode]) for mode in args.modes}
            cells = ", ".join(
                f"{mode} {medians[mode] * 1e3:.2f} ms ({medians[mode] / medians['bare']:.3f})"
                for mode in args.modes
            )
            print(f"round {index + 1}/{args.rounds}: {cells}", flush=True)

    if rank == 0:
        result = {
            "world_size": world,
            "params": params,
            "torch": torch.__version__,
            "threads_per_rank": torch.get_num_threads(),
            "rounds": rounds,
        }
        Path(args.result).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# -- launcher and report -------------------------------------------------------------
def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop torchrun's process group, if anything of it is left: SIGTERM
    first (torchrun then stops its workers, which run in sessions of their
    own), SIGKILL after STOP_GRACE_S. Workers whose torchrun is SIGKILLed die
    with it (die_with_parent)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def launch(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result = workdir / "result.json"
    command = standalone_launch(
        "torch.distributed.run",
        args.nproc,
        str(Path(__file__).resolve()),
        "--worker",
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--rounds",
        str(args.rounds),
        "--modes",
        ",".join(args.modes),
        "--save-every",
        str(args.save_every),
        "--run-root",
        str(workdir / "runs"),
        "--result",
        str(result),
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        code = proc.wait(args.timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"overhead: the job ran past --timeout {args.timeout:.0f} s") from None
    finally:
        stop(proc)
    if code != 0 or not result.exists():
        for line in jitckpt_detections(workdir / "runs"):
            print(f"overhead: {line}", file=sys.stderr)
        raise SystemExit(f"overhead: the torchrun job failed (exit status {code})")
    return json.loads(result.read_text())


def jitckpt_detections(run_root: Path) -> list[str]:
    """What jitckpt itself detected in the jitckpt rounds (e.g. a hang declared
    because the loaded machine stalled a step past the watchdog's timeout):
    the run directories are deleted after the job, so report it now."""
    from jitckpt.events import read_events

    lines = []
    for run_dir in sorted(run_root.glob("*")):
        for event in read_events(run_dir):
            if event.get("event") in (ev.DETECT, ev.SAVE_SKIPPED, ev.WARNING):
                fields = ", ".join(
                    f"{key}={event[key]}"
                    for key in ("rank", "cause", "detail", "reason")
                    if key in event
                )
                lines.append(f"{run_dir.name}: jitckpt {event['event']}: {fields}")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="ranks (default 4)")
    parser.add_argument(
        "--steps", type=int, help=f"timed steps per mode and round ({DEFAULT_STEPS})"
    )
    parser.add_argument("--warmup", type=int, help=f"untimed steps per round ({DEFAULT_WARMUP})")
    parser.add_argument("--rounds", type=int, help=f"rounds ({DEFAULT_ROUNDS})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ROUNDS} rounds x {QUICK_STEPS} steps (+{QUICK_WARMUP} warmup)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated modes, bare among them (default {','.join(MODES)}; "
        f"all: {','.join(ALL_MODES)})",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=DEFAULT_SAVE_EVERY,
        help=f"steps between checkpoints in the checkpoint modes ({DEFAULT_SAVE_EVERY})",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="kill the job after this many s"
    )
    # Internal: how the torchrun job runs this file as a worker.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-root", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps, warmup, rounds = (
        (QUICK_STEPS, QUICK_WARMUP, QUICK_ROUNDS)
        if args.quick
        else (DEFAULT_STEPS, DEFAULT_WARMUP, DEFAULT_ROUNDS)
    )
    args.steps = steps if args.steps is None else args.steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.rounds = rounds if args.rounds is None else args.rounds
    if args.steps < 2 or args.warmup < 0 or args.rounds < 1 or args.nproc < 1:
        parser.error("need --steps >= 2, --warmup >= 0, --rounds >= 1, --nproc >= 1")
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = set(args.modes) - set(ALL_MODES)
    if unknown or "bare" not in args.modes or len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes: bare once plus any of {', '.join(ALL_MODES[1:])}")
    if args.save_every < 1:
        parser.error("--save-every must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    # A SIGTERM to the benchmark (a test's timeout) must still run the cleanup.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="jitckpt-overhead-"))
    try:
        raw = launch(args, workdir)
    except KeyboardInterrupt:
        print("overhead: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(raw)
    summary["raw_rounds"] = raw["rounds"]  # every timed step, seconds (wall and CPU)
    summary["config"] = {
        "nproc": args.nproc,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "modes": args.modes,
        "save_every": args.save_every,
    }
    summary["source"] = source_state()
    summary["wall_s"] = time.monotonic() - started
    summary["load_avg_before"], summary["load_avg_after"] = load_before, os.getloadavg()[0]
    print(report(summary))
    print(
        f"wall time {summary['wall_s']:.1f} s; 1-min load average {load_before:.1f} before, "
        f"{summary['load_avg_after']:.1f} after on {os.cpu_count()} CPUs (the job's own ranks "
        f"add about {args.nproc}; more means other work shared the cores)",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
