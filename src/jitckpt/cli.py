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


def console() -> None:
    """The ``jitckpt`` command (and ``python -m jitckpt``): ``main`` on the
    command line's arguments. After ``run`` the launcher has stopped every
    worker and written its output, and ends without finalizing the
    interpreter (jitckpt.process_exit: torch's finalization costs ~0.5 s)."""
    argv = sys.argv[1:]
    status = main(argv)
    if argv[:1] == ["run"]:
        from jitckpt.process_exit import end_process

        end_process(status)
    raise SystemExit(status)


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

        if "--verify" not in rest:
            return inspect_main(rest)  # without torch
        from jitckpt.checkpoint.restorer import decode_checked

        return inspect_main(rest, decoder=decode_checked)
    if command == "report":
        from jitckpt.analysis.report import main as report_main

        return report_main(rest)
    if command == "simulate":
        from jitckpt.analysis.simulate import main as simulate_main

        return simulate_main(rest)
    print(f"jitckpt: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2
