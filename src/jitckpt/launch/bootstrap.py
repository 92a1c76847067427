"""Worker entry point used by ``jitckpt run``: ``python -m jitckpt.launch.bootstrap
SCRIPT ARGS...`` (or ``--module MOD ARGS...``).

It installs the SIGTERM thread before anything else runs, while the process
still has a single thread, so every thread torch and gloo start later
inherits the blocked mask (see jitckpt.detect.signals), makes a plain
``torch.distributed.init_process_group`` build jitckpt's group
(jitckpt.launch.adopt), then runs the training script as ``__main__``. When
the script ends, the worker ends as the script would (same exit status,
atexit handlers, open files flushed) without Python's finalization, which
is slow with torch loaded and can abort the process after an in-process
recovery (jitckpt.process_exit; JITCKPT_FINALIZE=1 asks for it). Importing
the jitckpt package here is cheap: its public names load lazily, and this
module imports only the standard library.
"""

from __future__ import annotations

import os
import runpy
import sys
import warnings

from jitckpt import process_exit
from jitckpt.detect import signals
from jitckpt.launch import adopt

# Third-party warnings every worker would print on every start, that say
# nothing about the user's job: the console of a 4-rank job carried 4 copies
# per attempt. Matched exactly, so any other warning still shows.
KNOWN_NOISE = (
    # torchdata's StatefulDataLoader calls torch.set_vital, deprecated in torch 2.13.
    (UserWarning, r"'set_vital' is deprecated"),
)


def main(argv: list[str]) -> None:
    signals.install()
    adopt.install()
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        _run(argv)
    except SystemExit as exc:
        process_exit.script_ended(process_exit.status_of(exc, quiet=True))
        if process_exit.finalize_wanted():
            raise
        status = process_exit.status_of(exc)
    except BaseException:
        if process_exit.finalize_wanted():
            raise
        # What Python does with an uncaught exception (130: Ctrl-C).
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
        status = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    else:
        process_exit.script_ended(0)
        _say_if_transparent_followed_nothing()
        if process_exit.finalize_wanted():
            return
        status = 0
    process_exit.end_process(status)


def _say_if_transparent_followed_nothing() -> None:
    from jitckpt import protocol

    if not os.environ.get(protocol.TRANSPARENT_RUN_DIR_ENV) or adopt.transparent_installed:
        return
    if os.environ.get(protocol.RANK_ENV, "0") != "0":
        return
    print(
        "jitckpt: --transparent followed nothing: the script never called "
        "torch.distributed.init_process_group() in the form that reads the launcher's "
        "environment (no store=, init_method None or 'env://'), so no JIT checkpoint could "
        "be taken. Use that form, or the user-level API.",
        file=sys.stderr,
        flush=True,
    )


def _run(argv: list[str]) -> None:
    if argv[:1] == ["--module"]:
        if len(argv) < 2:
            raise SystemExit("usage: python -m jitckpt.launch.bootstrap --module MODULE [ARGS...]")
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        if not argv:
            raise SystemExit("usage: python -m jitckpt.launch.bootstrap SCRIPT [ARGS...]")
        sys.argv = list(argv)
        # As `python SCRIPT` does: the script's directory comes first on the path.
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
