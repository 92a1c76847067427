"""The whole benchmark suite in one command: JSON plus a markdown table.

    python benchmarks/suite.py                 # full: 16 min at load 5-11 on 2 cores (README)
    python benchmarks/suite.py --quick         # smoke run: 1 failure per system, 1-2 minutes
    python benchmarks/suite.py --out DIR       # where suite.json and suite.md go (runs/bench)

Everything runs on this machine, the example GPT (examples/train_gpt.py,
0.87M parameters, AdamW, its LR schedule and data) at --ranks data-parallel
replicas (2 by default: torchft's setting in docs/platform.md, "Peer systems
measured on the same machine", and 2 cores), and
every figure comes with its baseline measured in the same command:

1. steady state: step time of the loop with jitckpt against the bare loop
   (benchmarks/overhead.py, one torchrun job, modes interleaved per round);
2. periodic checkpoints at one interval (--save-every) in the same job:
   synchronous torch.save, asynchronous DCP ``async_save`` and jitckpt's
   periodic backstop; the loop's blocking per checkpoint against
   torch.save's, the mean step time against bare's;
3. recovery, split into its parts, for a SIGKILLed and a hung replica
   under ``jitckpt run``, and iterations lost (benchmarks/drills.py);
4. beside peers, the same failure (SIGKILL of one replica mid-training):
   plain torchrun restarting from periodic DCP checkpoints, and torchft
   0.2.0 (benchmarks/drills_torchft.py; with its DDP wrapper and with a
   plain all-reduce of the gradients), if installed
   (benchmarks/install_peers.sh). Recovery time (failure to the end of the
   first step begun after it and kept), iterations lost and whether the run
   survived, over --drills failures each; ratios against torchrun + DCP.

The drills put all failures of a system into one job (see drills.py).
Every process the suite starts carries JITCKPT_BENCH_TAG in its
environment and is SIGKILLed by pid at the end, also on failure, timeout,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import overhead
from drills import jitckpt_job, torchrun_dcp_job
from drills_torchft import torchft_job
from harness import TAG_VAR, kill_tagged, source_state
from suite_report import aggregate, machine, markdown

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "runs" / "bench"


class Plan:
    """Sizes of one suite run; --quick shrinks every part."""

    def __init__(self, quick: bool, drills: int | None, ranks: int) -> None:
        self.quick = quick
        self.ranks = ranks
        self.drills = drills or (1 if quick else 10)
        self.save_every = 4 if quick else 10
        # overhead.py: rounds x (warmup + steps) per mode, 5 modes.
        self.rounds, self.warmup, self.steps = (1, 1, 4) if quick else (4, 2, 16)
        self.gap = 5 if quick else 6  # steps between jitckpt's injected failures
        self.torchft_variants = ("ddp",) if quick else ("ddp", "allreduce")
        self.timeout_s = 240.0 if quick else 420.0  # one section's job


def run_steady(plan: Plan, workdir: Path) -> dict[str, Any]:
    argv = [
        "--nproc",
        str(plan.ranks),
        "--rounds",
        str(plan.rounds),
        "--warmup",
        str(plan.warmup),
        "--steps",
        str(plan.steps),
        "--modes",
        ",".join(overhead.ALL_MODES),
        "--save-every",
        str(plan.save_every),
        "--timeout",
        str(plan.timeout_s),
    ]
    args = overhead.parse_args(argv)
    summary = overhead.summarize(overhead.launch(args, workdir))
    summary["config"] = {
        "rounds": plan.rounds,
        "warmup": plan.warmup,
        "steps": plan.steps,
        "save_every": plan.save_every,
    }
    return summary


def sections(plan: Plan, tag: str) -> list[tuple[str, Callable[[Path], dict[str, Any]]]]:
    """(name, runner) of every part of the suite, in order."""
    n, ranks, timeout = plan.drills, plan.ranks, plan.timeout_s
    parts: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
        ("steady", lambda d: run_steady(plan, d)),
        ("jitckpt-kill", lambda d: jitckpt_job("kill", n, ranks, d, tag, timeout, plan.gap)),
        ("jitckpt-hang", lambda d: jitckpt_job("hang", n, ranks, d, tag, timeout, plan.gap)),
        (
            "torchrun-dcp-kill",
            lambda d: torchrun_dcp_job(n, ranks, plan.save_every, d, tag, timeout),
        ),
    ]
    for grads in plan.torchft_variants:
        parts.append(
            (
                f"torchft-{grads}-kill",
                lambda d, g=grads: torchft_job(n, ranks, d, tag, timeout, grads=g),  # type: ignore[misc]
            )
        )
    return parts


def run_suite(plan: Plan, tag: str, keep: Path | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="jitckpt-suite-"))
    try:
        for name, runner in sections(plan, tag):
            workdir = root / name
            workdir.mkdir()
            started, load = time.monotonic(), os.getloadavg()[0]
            print(f"suite: {name} (load average {load:.1f}) ...", flush=True)
            try:
                result = runner(workdir)
            except SystemExit as exc:  # overhead.launch reports a failed job this way
                result = {"error": str(exc.code)}
            finally:
                kill_tagged(tag)
            result["wall_s"] = time.monotonic() - started
            result["load_avg_before"] = load
            results[name] = result
            print(f"suite: {name} done in {result['wall_s']:.0f} s", flush=True)
    finally:
        if keep is not None:
            shutil.copytree(root, keep, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 failure per system, short loops")
    parser.add_argument("--drills", type=int, help="failures per system (10; --quick: 1)")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel replicas (2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output ({DEFAULT_OUT})")
    parser.add_argument("--keep-runs", action="store_true", help="keep logs in OUT/runs")
    args = parser.parse_args(argv)
    if args.drills is not None and args.drills < 1:
        parser.error("--drills must be at least 1")
    if args.ranks < 2:
        parser.error("--ranks must be at least 2 (one replica fails, one survives)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(args.quick, args.drills, args.ranks)
    tag = uuid.uuid4().hex
    # Every child inherits the tag, also those that overhead.py starts.
    os.environ[TAG_VAR] = tag
    # A SIGTERM to the suite (a test's timeout) must still run the cleanup.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    command = " ".join(["python", "benchmarks/suite.py", *(argv or sys.argv[1:])])
    started = time.monotonic()
    load_before = os.getloadavg()
    source = source_state()
    try:
        results = run_suite(plan, tag, args.out / "runs" if args.keep_runs else None)
    except KeyboardInterrupt:
        print("suite: interrupted", file=sys.stderr)
        return 130
    finally:
        leftovers = kill_tagged(tag)
        if leftovers:
            print(f"suite: killed leftover processes {leftovers}", file=sys.stderr)
    report: dict[str, Any] = {
        "command": command,
        "quick": plan.quick,
        "config": vars(plan),
        "source": source,
        "machine": machine(load_before, os.getloadavg()),
        "wall_s": time.monotonic() - started,
        "sections": results,
        "summary": aggregate(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / "suite.md").write_text(table)
    print(table)
    print(f"suite: wrote {args.out / 'suite.json'} and {args.out / 'suite.md'}")
    errors = [name for name, result in results.items() if result.get("error")]
    for name in errors:
        print(f"suite: {name} failed: {results[name]['error'][:2000]}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
