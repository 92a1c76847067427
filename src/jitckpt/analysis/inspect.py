"""``jitckpt inspect DIR``: the checkpoints of a run and whether each is valid."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jitckpt import storage
from jitckpt.errors import CheckpointError

# Decodes a verified payload and checks it against its manifest, raising
# CheckpointError (jitckpt.checkpoint.restorer.decode_checked: the CLI passes
# it, as it needs torch and this module must not import it).
Decoder = Callable[[bytearray, storage.Candidate], Any]


def main(argv: list[str], decoder: Decoder | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jitckpt inspect", description=__doc__)
    parser.add_argument("run_dir", help="a run directory (or its checkpoints/ folder)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-read every file, check its checksum and decode the payload as a restore "
        "would (default: manifests and file sizes only)",
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if run_dir.name == storage.CHECKPOINTS_DIR:
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        print(f"jitckpt inspect: {run_dir} is not a directory", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    store = storage.run_storage(run_dir)
    for candidate in store.candidates():
        problem = candidate.problem
        if problem is None and candidate.manifest is not None:
            try:
                if args.verify:
                    # Every file: a sharded checkpoint has one per writer too.
                    store.verify_files(candidate)
                    if decoder is not None:
                        decoder(store.read_verified(candidate), candidate)
                else:
                    store.check_sizes(candidate)
            except CheckpointError as exc:
                problem = str(exc)
        m = candidate.manifest
        rows.append(
            {
                "path": str(candidate.path),
                "kind": m.kind if m else None,
                "step": m.step if m else None,
                "world_size": m.world_size if m else None,
                "writer_rank": m.writer_rank if m else None,
                "layout": m.layout.get("type") if m else None,
                "bytes": m.size if m else None,
                "valid": problem is None,
                "problem": problem,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'kind':9} {'step':>7} {'world':>5} {'writer':>6} {'MB':>8}  status")
        for r in rows:
            mb = f"{r['bytes'] / 1e6:.2f}" if r["bytes"] is not None else "-"
            status = "valid" if r["valid"] else f"INVALID: {r['problem']}"
            print(
                f"{r['kind'] or '?':9} {r['step'] if r['step'] is not None else '?':>7} {r['world_size'] or '?':>5} {r['writer_rank'] if r['writer_rank'] is not None else '?':>6} {mb:>8}  {status}  {Path(r['path']).name}"
            )
        if not rows:
            print("(no checkpoints)")
    return 0 if any(r["valid"] for r in rows) else 1
