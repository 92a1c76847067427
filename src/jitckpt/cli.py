"""The ``jitckpt`` command line: run, inspect, report, simulate."""

from __future__ import annotations

import sys

USAGE = """usage: jitckpt COMMAND ...

commands:
  run [torchrun options] [--inject SPEC]... SCRIPT [ARGS]   launch training with JIT checkpointing
  inspect DIR [--json] [--verify]                         list a run's checkpoints and whether each is valid
  report DIR [--json] [--plot FILE.png]                   failures, recovery timeline and goodput of a run
  simulate [options] [--from-run DIR] [--monte-carlo]     wasted GPU time: periodic vs JIT checkpointing
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        from jitckpt.launch.launcher import run

        return run(rest)
    if command == "inspect":
        from jitckpt.analysis.inspect import main as inspect_main

        return inspect_main(rest)
    if command == "report":
        from jitckpt.analysis.report import main as report_main

        return report_main(rest)
    if command == "simulate":
        from jitckpt.analysis.simulate import main as simulate_main

        return simulate_main(rest)
    print(f"jitckpt: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2
