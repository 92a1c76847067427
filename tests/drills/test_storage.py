"""Storage behaviour end to end: the periodic backstop when JIT cannot help,
retention, and inspect."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs import TINY, example_args, jitckpt_run, run_tagged, show

from jitckpt import storage
from jitckpt.events import read_events


def test_periodic_backstop_covers_a_failure_jit_cannot(
    tmp_path: Path, example_reference: str
) -> None:
    """Periodic checkpoints every 4 steps; a failure at 6 whose JIT
    checkpoints are lost (simulated: removed) resumes from step 4, and the
    run ends bitwise equal to a failure-free one: the periodic copy, taken
    while forward and backward ran, is exactly the state of step 4."""
    run_dir = tmp_path / "run"
    args = [*example_args(run_dir, tmp_path / "digest"), "--save-every", "4"]
    first = jitckpt_run(
        # The restart path with no restart left: the job ends at the failure.
        "--recovery", "restart", "--max-restarts", "0", "--inject", "kill@step=6,rank=2,phase=backward",
        *args,
    )  # fmt: skip
    assert first.returncode != 0, show(first)
    kinds: dict[str, int] = {}
    for c in storage.run_storage(run_dir).candidates():
        kinds[c.manifest.kind] = max(kinds.get(c.manifest.kind, -1), c.step)
    assert kinds.get("jit") == 6 and kinds.get("periodic") == 4, kinds
    # JIT could not help (simulated: its checkpoints are gone).
    for candidate in storage.run_storage(run_dir).candidates():
        if candidate.manifest and candidate.manifest.kind == "jit":
            shutil.rmtree(candidate.path)
    second = jitckpt_run(*args)
    assert second.returncode == 0, show(second)
    assert "jitckpt: resumed from step 4 (periodic checkpoint" in second.output
    restore = [e for e in read_events(run_dir) if e["event"] == "restore"]
    assert [(e["kind"], e["step"]) for e in restore] == [("periodic", 4)] * 4
    assert (tmp_path / "digest").read_text().strip() == example_reference
    periodic = [e for e in read_events(run_dir) if e["event"] == "save" and e["kind"] == "periodic"]
    assert {e["step"] for e in periodic} == {4, 8, 12}
    assert all(e["rank"] == 0 for e in periodic), "replicas are identical: rank 0 writes alone"
    # Retention keeps the two newest periodic steps.
    assert sorted(
        c.step for c in storage.run_storage(run_dir).candidates() if c.manifest.kind == "periodic"
    ) == [8, 12]


def test_inspect_lists_valid_and_invalid_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    good = storage.run_storage(run_dir).write(
        storage.Manifest(kind="jit", step=3, world_size=4, writer_rank=1, attempt=0),
        b"x" * 100,
    )
    bad = storage.run_storage(run_dir).write(
        storage.Manifest(kind="periodic", step=5, world_size=4, writer_rank=0, attempt=0),
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 800 KiB filesystem (tmpfs): room for one checkpoint of the
    wide tiny model (~0.5 MB), not two."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_during_a_jit_save_keeps_the_previous_checkpoint(
    small_disk: Path, tmp_path: Path
) -> None:
    run_dir = small_disk / "run"
    args = [str(TINY), "--steps", "8", "--width", "4096", "--save-at", "2"]
    reference = jitckpt_run(
        *args, "--run-dir", str(tmp_path / "ref"), "--digest", str(tmp_path / "ref.digest"), nproc=1
    )
    assert reference.returncode == 0, show(reference)
    launch = jitckpt_run(
        "--recovery", "restart", "--inject", "raise@step=4,rank=0,phase=forward",
        *args, "--run-dir", str(run_dir), "--digest", str(tmp_path / "digest"),
        nproc=1,
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    assert "disk full while writing checkpoint step-000000004-jit-a0-r0" in launch.output, show(
        launch
    )
    assert "older checkpoints are untouched" in launch.output
    assert launch.resumed_steps() == [2], "the previous valid checkpoint was used"
    names = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert names == ["step-000000002-jit-a0-r0"], f"no partial copy may remain: {names}"
    assert (tmp_path / "digest").read_text() == (tmp_path / "ref.digest").read_text()
