"""Step-time cost of the framework callbacks, in one command.

    python benchmarks/integrations.py               # small models, about 10 minutes on 2 cores
    python benchmarks/integrations.py --size tiny   # the examples' models (steps of a few ms)
    python benchmarks/integrations.py --quick       # smoke run
    python benchmarks/integrations.py --aa          # also the noise: two runs without the callback
    python benchmarks/integrations.py --json out.json

What it measures: the wall time of a training step of the Hugging Face
Trainer (a GPT-2 built from a config as in examples/train_hf.py, 2 ranks,
DDP over gloo) with jitckpt's ``JitCheckpointCallback`` and without it, and
the same for PyTorch Lightning (the MLP of examples/train_lightning.py, wider)
when lightning is installed. Goal: the callback adds at most 1 % to a step.
The callback's own work per step is fixed: a step boundary on the training
thread, about 0.04 ms for the Trainer and 0.1 ms for Lightning (whose loop
state is copied at every boundary), plus two side threads that wake 14 times
a second (hang watchdog, heartbeat). So the ratio depends on the step time:
--size tiny shows it on steps of a few ms, the default on steps of tens of
ms (Lightning, ~45 ms) to hundreds (the Trainer's GPT-2, ~210 ms).

How: one ``torchrun --standalone`` job of 2 ranks runs this file again with
--worker. In every round each worker builds a fresh Trainer per mode (with
and without the callback, and with --aa a second one without it: the order
rotates between rounds, so every arm sees the same machine) and trains
--steps steps; rank 0 notes three clocks at the start of every step (a
timing callback that is there in every arm): the wall clock, its process's
CPU time (all threads) and the training thread's own CPU time. A step's
period covers everything up to the next one, the callback's hooks included;
the medians of the steps after --warmup are kept. The ratios are taken per
round (with / without) and summarised by their medians: wall time (the
goal's measure) and the two CPU times (less sensitive to how the two ranks
share the cores, so they show a small fixed cost more clearly). With --aa
the second run without the callback against the first gives the same ratios
for two identical arms: the scatter a 1 % goal has to be read against (on
this 2-core machine per-round A/A wall ratios of 0.80-1.16 were seen while
other work ran, 0.90-1.08 with nothing else running). Each round is
printed as it ends.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Model sizes (--size): "tiny" is the examples' (a step of a few ms, where a
# fixed per-step cost of ~0.1 ms is several per cent); "small" has steps of
# tens of ms, closer to real training, where the goal is meant.
SIZES = {
    "tiny": {"hf": {"n_layer": 2, "n_embd": 64, "n_head": 2, "seq": 32, "batch": 2},
             "pl": {"features": 16, "hidden": 32, "batch": 4}},
    "small": {"hf": {"n_layer": 4, "n_embd": 256, "n_head": 4, "seq": 128, "batch": 4},
              "pl": {"features": 1024, "hidden": 4096, "batch": 64}},
}  # fmt: skip


# Rank 0 prints each round's measurements on a line of its own, so marked.
ROUND_PREFIX = "ROUND "
# Rank 0's clocks per step, in StepClock.tick's order: the key suffix in a
# round's results, and what it is.
CLOCKS = {"wall": "_s", "cpu": "_cpu_s", "main_cpu": "_main_cpu_s"}
CLOCK_TITLES = {
    "wall": "wall time per step",
    "cpu": "CPU time per step (all threads)",
    "main_cpu": "CPU time per step (training thread)",
}


class StepClock:
    """Rank 0's clocks at the start of every step: wall time, this process's
    CPU time (all threads) and the training thread's own CPU time. A step's
    period runs from its start to the next one's, so it covers everything
    between (every callback of every hook, the framework's own work,
    background threads' CPU)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, float]] = []

    def tick(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time(), time.thread_time()))

    def medians(self, warmup: int) -> tuple[float, float, float]:
        """Median wall period, CPU and training-thread CPU per step, after
        ``warmup`` steps."""
        marks = self.marks[warmup:]
        pairs = list(zip(marks[:-1], marks[1:], strict=True))
        return tuple(  # type: ignore[return-value]
            statistics.median(b[clock] - a[clock] for a, b in pairs) for clock in range(len(CLOCKS))
        )


def hf_round(
    with_callback: bool, steps: int, warmup: int, workdir: Path, size: str
) -> tuple[float, float, float]:
    """Median step period and CPU times (s) of one Trainer run, rank 0's view."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    sys.path.insert(0, str(REPO / "examples"))
    from train_hf import SyntheticTokens

    from jitckpt.integrations.huggingface import JitCheckpointCallback

    clock = StepClock()

    class Timer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    torch.manual_seed(0)
    shape = SIZES[size]["hf"]
    config = GPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
        vocab_size=256, n_positions=shape["seq"], bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    callbacks: list[Any] = [Timer()]
    if with_callback:
        callbacks.insert(0, JitCheckpointCallback(run_dir=workdir / "jitckpt"))
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=TrainingArguments(
            output_dir=str(workdir / "out"), max_steps=steps + warmup,
            per_device_train_batch_size=shape["batch"], save_strategy="no", report_to=[], use_cpu=True,
            ddp_backend="gloo", ddp_find_unused_parameters=False, logging_steps=10_000,
            disable_tqdm=True, seed=0,
        ),
        train_dataset=SyntheticTokens(4096, seq=shape["seq"]),
        callbacks=callbacks,
    )  # fmt: skip
    trainer.train()
    return clock.medians(warmup)


def lightning_round(
    with_callback: bool, steps: int, warmup: int, workdir: Path, size: str
) -> tuple[float, float, float]:
    """Median step period and CPU times (s) of one Lightning fit, rank 0's view."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    sys.path.insert(0, str(REPO / "examples"))
    from train_lightning import Regressor, dataset

    from jitckpt.integrations.lightning import JitCheckpointCallback

    clock = StepClock()

    class Timer(pl.Callback):  # type: ignore[misc]
        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            clock.tick()

    pl.seed_everything(0, verbose=False)
    callbacks: list[Any] = [Timer()]
    if with_callback:
        callbacks.insert(0, JitCheckpointCallback(run_dir=workdir / "jitckpt"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
        max_steps=steps + warmup, default_root_dir=str(workdir), logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=callbacks,
    )  # fmt: skip
    shape = SIZES[size]["pl"]
    data = dataset(8192, features=shape["features"])
    loader = torch.utils.data.DataLoader(data, batch_size=shape["batch"], shuffle=True)
    trainer.fit(Regressor(features=shape["features"], hidden=shape["hidden"]), loader)
    return clock.medians(warmup)


FRAMEWORKS = {"huggingface": hf_round, "lightning": lightning_round}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory(prefix="jitckpt-bench-integrations-") as tmp:
        for name in args.frameworks.split(","):
            run = FRAMEWORKS[name]
            for index in range(args.rounds):
                # Arms in a rotating order, so that each sees every position
                # in a round; --aa adds a second run without the callback.
                arms = ["bare", "callback", *(["bare2"] if args.aa else [])]
                shift = index % len(arms)
                times = {}
                for arm in arms[shift:] + arms[:shift]:
                    workdir = Path(tmp) / f"{name}-{index}-{arm}"
                    times[arm] = run(arm == "callback", args.steps, args.warmup, workdir, args.size)
                measured = {
                    f"{arm}{suffix}": value for arm, clocks in times.items()
                    for suffix, value in zip(CLOCKS.values(), clocks, strict=True)
                }  # fmt: skip
                if rank == 0:  # each round as it ends: a long run shows progress
                    print(ROUND_PREFIX + json.dumps({"framework": name, **measured}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--frameworks", default=None, help="comma-separated (default: installed)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--aa",
        action="store_true",
        help="also run each round a second time without the callback and report that A/A "
        "ratio: the machine's noise, against which the callback's ratio is read",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.frameworks is None:
        import importlib.util

        args.frameworks = ",".join(
            name
            for name, module in (("huggingface", "transformers"), ("lightning", "lightning"))
            if name in FRAMEWORKS and importlib.util.find_spec(module) is not None
        )
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 20, 5
    if args.worker:
        worker(args)
        return
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        __file__, "--worker", "--rounds", str(args.rounds), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--frameworks", args.frameworks, "--size", args.size,
        *(["--aa"] if args.aa else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results: dict[str, list[dict[str, float]]] = {}
    total = args.rounds * len(args.frameworks.split(","))
    # One pipe for both streams: reading stdout alone while the frameworks'
    # warnings filled an unread stderr pipe would stall the job.
    others: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as job:
        assert job.stdout is not None
        for line in job.stdout:
            if not line.startswith(ROUND_PREFIX):
                others.append(line)
                continue
            measured = json.loads(line.removeprefix(ROUND_PREFIX))
            name = measured.pop("framework")
            results.setdefault(name, []).append(measured)
            done = sum(len(rounds) for rounds in results.values())
            aa = f", A/A {measured['bare2_s'] / measured['bare_s']:.3f}" if args.aa else ""
            print(
                f"[{done}/{total}] {name} round {len(results[name])}: with/without the callback "
                f"{measured['callback_s'] / measured['bare_s']:.3f}{aa}",
                file=sys.stderr,
                flush=True,
            )
    if job.returncode != 0 or not results:
        sys.stderr.write("".join(others))
        raise SystemExit(f"benchmark job failed (exit {job.returncode})")
    summary = {}
    for name, rounds in results.items():
        # Per-round ratios of each clock: the callback's run against the one
        # without it, and (--aa) a second run without it against the first,
        # how far apart identical arms land on this machine (the noise a
        # ratio must be read against).
        ratios = {
            f"{pair}_{clock}": [r[f"{arm}{suffix}"] / r[f"bare{suffix}"] for r in rounds if f"{arm}_s" in r]
            for pair, arm in (("callback", "callback"), ("aa", "bare2"))
            for clock, suffix in CLOCKS.items()
        }  # fmt: skip
        medians = {key: statistics.median(values) for key, values in ratios.items() if values}
        summary[name] = {
            "size": args.size,
            "rounds": rounds,
            "median_ratios": medians,
            "bare_ms": 1e3 * statistics.median(r["bare_s"] for r in rounds),
            "callback_ms": 1e3 * statistics.median(r["callback_s"] for r in rounds),
        }
        print(
            f"{name}: median step {summary[name]['bare_ms']:.2f} ms without the callback, "
            f"{summary[name]['callback_ms']:.2f} ms with it ({args.size} model, {len(rounds)} rounds)"
        )
        for pair, label in (
            ("callback", "with/without the callback"),
            ("aa", "A/A, without/without"),
        ):
            for clock, title in CLOCK_TITLES.items():
                key = f"{pair}_{clock}"
                if key in medians:
                    goal = " (goal <= 1.01)" if key == "callback_wall" else ""
                    print(
                        f"  {label}, {title}: median ratio {medians[key]:.4f}{goal}; "
                        f"rounds {', '.join(f'{r:.3f}' for r in ratios[key])}"
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
