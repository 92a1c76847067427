"""Shared-memory staging: JIT saves go to host shared memory first and are
persisted to the run directory by a detached process; restore prefers the
staged copy and falls back to the durable one. Either way the run ends
bitwise equal to a failure-free run."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs import TINY, jitckpt_run, show

from jitckpt.events import read_events
from jitckpt.protocol import EXIT_SAVED_AND_STOPPED

SHM = Path("/dev/shm")


@pytest.fixture
def stage_dir(tmp_path: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="jitckpt-test-", dir=SHM if SHM.is_dir() else tmp_path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(run_dir: Path, digest: Path, stage: Path | None, *extra: str):  # type: ignore[no-untyped-def]
    env = {"JITCKPT_STAGE_DIR": str(stage)} if stage is not None else None
    args = ["--run-dir", str(run_dir), "--steps", "8", "--digest", str(digest)]
    return jitckpt_run(*extra, str(TINY), *args, nproc=2, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("reference")
    launch = run(base / "run", base / "digest", None)
    assert launch.returncode == 0, show(launch)
    return (base / "digest").read_text()


def wait_for_persisted(run_dir: Path, count: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        done = [e for e in read_events(run_dir) if e["event"] in ("persisted", "persist_failed")]
        if len(done) >= count or time.monotonic() > deadline:
            return done
        time.sleep(0.1)


def test_restart_restores_from_the_staged_copy(
    tmp_path: Path, stage_dir: Path, reference: str
) -> None:
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    launch = run(
        run_dir, digest, stage_dir,
        "--recovery", "restart", "--inject", "kill@step=4,rank=1,phase=forward",
    )  # fmt: skip
    assert launch.returncode == 0, show(launch)
    assert launch.resumed_steps() == [4], show(launch)
    events = read_events(run_dir)
    saves = [e for e in events if e["event"] == "save" and e["kind"] == "jit"]
    assert saves and all(e["staged"] and e["path"].startswith(str(stage_dir)) for e in saves)
    restores = [e for e in events if e["event"] == "restore"]
    assert [(e["step"], e["source"]) for e in restores] == [(4, "staged")] * 2, restores
    assert digest.read_text() == reference
    persisted = wait_for_persisted(run_dir, len(saves))
    assert [e["event"] for e in persisted] == ["persisted"] * len(saves), persisted
    durable = sorted(p.name for p in (run_dir / "checkpoints").glob("step-000000004-jit-*"))
    assert durable == sorted(Path(e["path"]).name for e in saves)
    # Normal exit removes the run's staged copies; only the user's private
    # directory (mode 0700) stays.
    (private,) = stage_dir.iterdir()
    assert private.name == f"jitckpt-{os.geteuid()}" and private.stat().st_mode & 0o777 == 0o700
    assert not any(private.iterdir()), list(stage_dir.rglob("*"))


def test_without_the_staged_copy_the_durable_one_is_used(
    tmp_path: Path, stage_dir: Path, reference: str
) -> None:
    run_dir, digest = tmp_path / "run", tmp_path / "digest"
    first = run(run_dir, digest, stage_dir, "--inject", "term@step=4,rank=0,phase=forward")
    assert first.returncode == EXIT_SAVED_AND_STOPPED, show(first)
    saves = [e for e in read_events(run_dir) if e["event"] == "save" and e["kind"] == "jit"]
    assert len(saves) == 2 and all(e["staged"] for e in saves), saves
    # The launcher waited for the persisters before it exited, then freed
    # the shared memory of the copies they persisted.
    assert [e["event"] for e in wait_for_persisted(run_dir, 0)] == ["persisted"] * 2
    assert not list(stage_dir.rglob("step-*")) and not list(stage_dir.rglob(".tmp-*"))
    # The node's shared memory is gone (a reboot, another node): only the
    # durable copies remain.
    for child in stage_dir.iterdir():
        shutil.rmtree(child)
    second = run(run_dir, digest, stage_dir)
    assert second.returncode == 0, show(second)
    # The newest saved step (the ranks stop at the boundary after SIGTERM
    # reaches them, which the launcher forwards a few tiny steps after step 4).
    assert second.resumed_steps() == [max(e["step"] for e in saves)] and saves[0]["step"] >= 4, (
        show(second)
    )
    restores = [e for e in read_events(run_dir) if e["event"] == "restore"]
    assert {e["source"] for e in restores} == {"durable"}, restores
    assert digest.read_text() == reference
