"""``python -m jitckpt.storage.persist STAGED DURABLE_ROOT RUN_DIR``: copy one staged
checkpoint to durable storage (see jitckpt.storage.staging).

Runs as a detached process started by the saver, so it must not import
torch (a second of start-up) and must not need the saver alive. The copy
is verified against the staged checksum before it is written, and written
with the same atomic protocol as every checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jitckpt import events as ev
from jitckpt.errors import JitckptError
from jitckpt.events import EventLog
from jitckpt.storage.directory import DirectoryStorage
from jitckpt.storage.manifest import read_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jitckpt.storage.persist", description=__doc__)
    parser.add_argument("staged", type=Path)
    parser.add_argument("durable_root", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rank", type=int, default=-1)
    parser.add_argument("--attempt", type=int, default=-1)
    args = parser.parse_args(argv)
    events = EventLog(args.run_dir, rank=args.rank, attempt=args.attempt, role="persister")
    started = time.monotonic()
    source = DirectoryStorage(args.staged.parent)
    try:
        candidate = source.find(args.staged.name)
        if candidate is None:
            raise JitckptError(f"{args.staged}: staged checkpoint vanished before persisting")
        data = source.read_verified(candidate)
        path = DirectoryStorage(args.durable_root).write(read_manifest(args.staged), data)
        persisted = DirectoryStorage(args.durable_root).find(path.name)
        if persisted is None or persisted.checksum != candidate.checksum:
            raise JitckptError(f"{path}: durable copy differs from the staged one")
    except JitckptError as exc:
        events.emit(ev.PERSIST_FAILED, path=str(args.staged), error=str(exc))
        print(f"jitckpt: persisting {args.staged} failed: {exc}", file=sys.stderr, flush=True)
        return 1
    events.emit(
        ev.PERSISTED,
        path=str(path),
        staged=str(args.staged),
        bytes=len(data),
        duration=time.monotonic() - started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
