"""Storage behaviour end to end: the periodic backstop when JIT cannot help,
retention, and inspect."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from jobs import EXAMPLE, jitckpt_run, run_tagged, show

from jitckpt import storage
from jitckpt.events import read_events


def test_periodic_backstop_covers_a_failure_jit_cannot(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        str(EXAMPLE),
        "--steps",
        "30",
        "--run-dir",
        str(run_dir),
        "--save-every",
        "10",
        "--deterministic",
    ]
    first = jitckpt_run(  # fmt: skip
        # The restart path with no restart left: the job ends at the failure.
        "--recovery",
        "restart",
        "--max-restarts",
        "0",
        "--inject",
        "kill@step=25,rank=2,phase=backward",
        *args,
    )
    assert first.returncode != 0, show(first)
    kinds: dict[str, int] = {}
    for c in storage.candidates(run_dir):
        kinds[c.manifest["kind"]] = max(kinds.get(c.manifest["kind"], -1), c.step)
    assert kinds.get("jit") == 25 and kinds.get("periodic") == 20, kinds
    # JIT could not help (simulated: its checkpoints are gone).
    for candidate in storage.candidates(run_dir):
        if candidate.manifest and candidate.manifest["kind"] == "jit":
            shutil.rmtree(candidate.path)
    second = jitckpt_run(*args)
    assert second.returncode == 0, show(second)
    assert "jitckpt: resumed from step 20 (periodic checkpoint" in second.output
    restore = [e for e in read_events(run_dir) if e["event"] == "restore"]
    assert [(e["kind"], e["step"]) for e in restore] == [("periodic", 20)] * 4
    periodic = [e for e in read_events(run_dir) if e["event"] == "save" and e["kind"] == "periodic"]
    assert {e["step"] for e in periodic} == {10, 20, 30}
    assert all(e["rank"] == 0 for e in periodic), "replicas are identical: rank 0 writes alone"
    # Retention keeps the two newest periodic steps.
    assert sorted(
        c.step for c in storage.candidates(run_dir) if c.manifest["kind"] == "periodic"
    ) == [20, 30]


def test_inspect_lists_valid_and_invalid_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    good = storage.write_checkpoint(
        run_dir,
        {"kind": "jit", "step": 3, "world_size": 4, "writer_rank": 1, "attempt": 0},
        b"x" * 100,
    )
    bad = storage.write_checkpoint(
        run_dir,
        {"kind": "periodic", "step": 5, "world_size": 4, "writer_rank": 0, "attempt": 0},
        b"y" * 100,
    )
    (bad / storage.PAYLOAD).write_bytes(b"y" * 50)
    launch = run_tagged(
        [sys.executable, "-m", "jitckpt", "inspect", str(run_dir), "--json"], timeout=60
    )
    assert launch.returncode == 0, launch.output
    rows = {Path(r["path"]).name: r for r in json.loads(launch.output)}
    assert rows[good.name]["valid"] and rows[good.name]["step"] == 3
    assert not rows[bad.name]["valid"] and "truncated" in rows[bad.name]["problem"]
    # A flipped byte keeps the size: only --verify's checksums see it.
    (good / storage.PAYLOAD).write_bytes(b"x" * 99 + b"!")
    launch = run_tagged(
        [sys.executable, "-m", "jitckpt", "inspect", str(run_dir), "--json"], timeout=60
    )
    assert {Path(r["path"]).name: r["valid"] for r in json.loads(launch.output)}[good.name]
    launch = run_tagged(
        [sys.executable, "-m", "jitckpt", "inspect", str(run_dir), "--verify"], timeout=60
    )
    assert launch.returncode == 1 and "checksum mismatch" in launch.output, launch.output
    shutil.rmtree(good)
    launch = run_tagged([sys.executable, "-m", "jitckpt", "inspect", str(run_dir)], timeout=60)
    assert launch.returncode == 1, "no valid checkpoint left"
    assert "INVALID" in launch.output and "truncated" in launch.output
