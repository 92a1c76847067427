"""The ``jitckpt`` command line: run, inspect, report, simulate."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: jitckpt COMMAND ...

commands:
  run [torchrun options] [--inject SPEC]... SCRIPT [ARGS]   launch training with JIT checkpointing
  inspect DIR [--json] [--verify]                         list a run's checkpoints and whether each is valid
  report DIR [--json]                                     failures and recoveries of a run, from its event log
  simulate [options] [--from-run DIR] [--monte-carlo]     wasted GPU time: periodic vs JIT checkpointing
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from jitckpt.launcher import run

        return run(rest)
    if command == "inspect":
        from jitckpt.inspect import main as inspect_main

        return inspect_main(rest)
    if command == "report":
        return _report(rest)
    if command == "simulate":
        from jitckpt.simulate import main as simulate_main

        return simulate_main(rest)
    print(f"jitckpt: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


def _report(argv: list[str]) -> int:
    from pathlib import Path

    from jitckpt.events import EVENTS_FILE
    from jitckpt.summary import format_summary, summary_json

    parser = argparse.ArgumentParser(
        prog="jitckpt report", description="Failures and recoveries of a run."
    )
    parser.add_argument("run_dir")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not (Path(args.run_dir) / EVENTS_FILE).is_file():
        print(
            f"jitckpt report: {args.run_dir} has no {EVENTS_FILE}; is it a jitckpt run directory?",
            file=sys.stderr,
        )
        return 2
    print(summary_json(args.run_dir) if args.json else format_summary(args.run_dir))
    return 0
