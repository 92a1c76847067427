"""Sharded models: FSDP2 fully_shard on a 1-D mesh and HSDP on a 2x2
replicate x shard mesh, 4 ranks on gloo (examples/train_gpt_fsdp.py).

Drills as in test_drills.py: a fault injected at a step and phase, the final
digest compared with one failure-free run shared by the module. To keep the
file to a few minutes, two failures share one launch where their steps
allow it. The writer choice and layout rules have unit tests of their own
(tests/unit/test_writers.py, test_mesh.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from jobs import REPO, Launch, jitckpt_run, show, two_nodes

from jitckpt import storage
from jitckpt.analysis.summary import summarize
from jitckpt.events import read_events
from jitckpt.protocol import EXIT_FATAL, EXIT_SAVED_AND_STOPPED

EXAMPLE_FSDP = REPO / "examples" / "train_gpt_fsdp.py"
EXAMPLE_DDP = REPO / "examples" / "train_gpt.py"
STEPS = 10
HSDP = "replicate=2,shard=2"


def fsdp_args(run_dir: Path, digest: Path, mesh: str = HSDP, steps: int = STEPS) -> list[str]:
    return [
        str(EXAMPLE_FSDP),
        "--mesh", mesh,
        "--steps", str(steps),
        "--run-dir", str(run_dir),
        "--digest", str(digest),
        "--log-every", "1",
        "--deterministic",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A failure-free HSDP run: its digest, and its run directory (with
    periodic sharded checkpoints, for the layout test)."""
    base = tmp_path_factory.mktemp("reference")
    launch = jitckpt_run(*fsdp_args(base / "run", base / "digest"), "--save-every", "5")
    assert launch.returncode == 0, show(launch)
    return (base / "digest").read_text().strip(), base / "run"


def check_recovered(
    run_dir: Path, digest: Path, reference: str, launch: Launch, resumes: list[int], dead: list[int]
) -> list[dict]:
    """``dead``: the rank each failure kills (-1: none dies)."""
    assert launch.returncode == 0, show(launch)
    assert digest.read_text().strip() == reference, "final state differs from the failure-free run"
    assert launch.resumed_steps() == resumes, show(launch)
    events = read_events(run_dir)
    failures = summarize(events)
    assert [f["resumed_step"] for f in failures] == resumes, failures
    for failure in failures:
        assert failure["restored_kind"] == "jit", failure
        assert failure["iterations_lost"] is not None and failure["iterations_lost"] <= 1, failure
    saves = [e for e in events if e["event"] == "save" and e["kind"] == "jit"]
    assert len(saves) == len(resumes)
    for save, lost in zip(sorted(saves, key=lambda e: e["t"]), dead, strict=True):
        # One rank per shard, not the dead one, and the state that was
        # written is bitwise the state that was loaded.
        assert len(save["writers"]) == 2 and lost not in save["writers"], save
        restored = [e for e in events if e["event"] == "restore" and e["path"] == save["path"]]
        assert restored and {e["digest"] for e in restored} == {save["digest"]}
    return failures


def test_hsdp_kills_in_every_phase_and_a_hang_resume_exactly(
    tmp_path: Path, reference: tuple[str, Path]
) -> None:
    """One job, five failures: kills in the forward (rank 2), backward (rank
    3), all-reduce (rank 1) and optimizer step (rank 1), and a hang in
    backward (rank 2). Each resumes from the JIT checkpoint the survivors
    wrote, one rank per shard and never the dead one: from the state before
    the failed step, or after it for the optimizer step (the others finish
    it); and the job ends bitwise equal to the failure-free run."""
    faults = [  # (spec, resumed step, the rank that is gone: -1 for the hang)
        ("kill@step=2,rank=2,phase=forward", 2, 2),
        ("kill@step=3,rank=3,phase=backward", 3, 3),
        ("hang@step=5,rank=2,phase=backward", 5, -1),
        ("kill@step=6,rank=1,phase=allreduce", 6, 1),
        ("kill@step=8,rank=1,phase=optimizer", 9, 1),
    ]
    injections = [arg for spec, _, _ in faults for arg in ("--inject", spec)]
    launch = jitckpt_run(
        "--max-restarts", "5", *injections, *fsdp_args(tmp_path / "run", tmp_path / "digest")
    )
    failures = check_recovered(
        tmp_path / "run",
        tmp_path / "digest",
        reference[0],
        launch,
        [resumed for _, resumed, _ in faults],
        [gone for _, _, gone in faults],
    )
    assert any(d["cause"] == "hang" for d in failures[2]["detections"]), failures[2]


def test_fsdp_exception_saves_every_shard_and_kill_falls_back_to_periodic(
    tmp_path: Path,
) -> None:
    """1-D FSDP. A rank raising before any collective broke leaves every rank
    alive: all shards are saved (its peers, blocked in a healthy all-gather,
    join through the store). A killed rank's shard exists nowhere else: the
    job resumes from the periodic checkpoint and says so."""
    run_dir = tmp_path / "run"
    launch = jitckpt_run(
        "--inject", "raise@step=2,rank=1,phase=forward",
        "--inject", "kill@step=5,rank=2,phase=backward",
        *fsdp_args(run_dir, tmp_path / "digest", mesh="shard=4", steps=7), "--save-every", "2",
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == [2, 4], show(launch)
    events = read_events(run_dir)
    (jit,) = [e for e in events if e["event"] == "save" and e["kind"] == "jit"]
    assert jit["step"] == 2 and jit["writers"] == [0, 1, 2, 3], jit
    # In the worker's log when it happens, and in the launcher's summary.
    assert "jit impossible: reason: no surviving replica of shard 2" in launch.output
    assert "no surviving replica of shard 2; resuming from periodic checkpoint at step 4" in (
        launch.output
    ), show(launch)
    first, second = summarize(events)
    assert first["restored_kind"] == "jit" and first["iterations_lost"] == 1, first
    assert second["restored_kind"] == "periodic", second


def test_fsdp_preemption_saves_every_shard(tmp_path: Path) -> None:
    """1-D FSDP, SIGTERM to every rank: all alive, so all shards are saved."""
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    args = fsdp_args(run_dir, digest, mesh="shard=4", steps=7)
    first = jitckpt_run("--inject", "term@step=3,rank=1,phase=forward", *args)
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    (jit,) = [c for c in storage.run_storage(run_dir).candidates() if c.manifest.kind == "jit"]
    assert jit.manifest.writer_ranks == [0, 1, 2, 3]
    assert jit.manifest.layout == {
        "type": "fsdp",
        "mesh_shape": [4],
        "mesh_dim_names": ["shard"],
    }
    second = jitckpt_run(*args)
    assert second.returncode == 0, show(second)
    assert second.resumed_steps() == [jit.step] and jit.step in (3, 4), show(second)
    (failure,) = summarize(read_events(run_dir))
    assert failure["iterations_lost"] is not None and failure["iterations_lost"] <= 1, failure


def test_bad_mesh_is_refused_before_training(tmp_path: Path) -> None:
    launch = jitckpt_run(
        *fsdp_args(tmp_path / "run", tmp_path / "digest", mesh="replicate=2,shard=2"), nproc=2
    )
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert "the mesh replicate=2,shard=2 has 4 ranks but this job has 2" in launch.output
    assert "not restarting" in launch.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sharded_checkpoint_into_a_ddp_job_is_refused(
    tmp_path: Path, reference: tuple[str, Path]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference[1], run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    launch = jitckpt_run(
        str(EXAMPLE_DDP), "--steps", "12", "--run-dir", str(run_dir), "--deterministic", nproc=2
    )
    assert launch.returncode == EXIT_FATAL, show(launch)
    assert "was written by a HSDP (mesh (2, 2) ('replicate', 'shard')) job and cannot be mapped " \
        "onto this DDP job" in launch.output, show(launch)  # fmt: skip
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_hsdp_shrinks_after_node_loss_and_grows_back(tmp_path: Path) -> None:
    """Two agents of 2 ranks (one replica each); one node dies; the other
    resumes at 1x2 from the JIT checkpoint its replica wrote. Then the job,
    submitted again at 4 ranks, grows back to 2x2 from the 1x2 checkpoint."""
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    codes, text = two_nodes(
        "node@step=2,rank=2,phase=forward",
        *fsdp_args(run_dir, digest, mesh="replicate=-1,shard=2", steps=5),
        "--save-every", "5",
    )  # fmt: skip
    assert codes == [-9, 0], text
    events = read_events(run_dir)
    (save,) = [e for e in events if e["event"] == "save" and e["kind"] == "jit"]
    assert save["writers"] == [0, 1] and save["step"] == 2
    manifest = json.loads((Path(save["path"]) / "manifest.json").read_text())
    assert manifest["layout"]["mesh_shape"] == [2, 2]
    restores = [e for e in events if e["event"] == "restore"]
    assert restores and {e["saved_world_size"] for e in restores} == {4}
    starts = [e for e in events if e["event"] == "start" and e["attempt"] == restores[0]["attempt"]]
    assert {e["world_size"] for e in starts} == {2}
    # The state loaded on the 1x2 mesh is bitwise the state the 2x2 mesh saved.
    assert {e["digest"] for e in restores} == {save["digest"]}
    assert digest.exists(), "training completed at world size 2"

    # Grow: the periodic checkpoint of the final step, written at 1x2, loads
    # onto 2x2, bitwise.
    grown = jitckpt_run(
        *fsdp_args(run_dir, tmp_path / "digest2", mesh="replicate=-1,shard=2", steps=6)
    )
    assert grown.returncode == 0 and grown.resumed_steps() == [5], show(grown)
    events = read_events(run_dir)
    (periodic,) = [e for e in events if e["event"] == "save" and e.get("step") == 5]
    assert periodic["kind"] == "periodic" and periodic["writers"] == [0, 1]
    regrown = [e for e in events if e["event"] == "restore" and e["path"] == periodic["path"]]
    assert {e["saved_world_size"] for e in regrown} == {2} and len(regrown) == 4
    assert {e["digest"] for e in regrown} == {periodic["digest"]}
