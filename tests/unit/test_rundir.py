"""The run directory (jitckpt.storage.rundir): refused before training when
it cannot hold checkpoints, and one id per run directory however many ranks
ask at once."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from jitckpt.errors import RunDirError
from jitckpt.storage import Manifest, run_storage
from jitckpt.storage.rundir import PRIVATE_DIR, RUN_FILE, prepare_run_dir, run_id


def test_prepare_creates_missing_parents(tmp_path: Path) -> None:
    path = prepare_run_dir(tmp_path / "a" / "b" / "run")
    assert path == tmp_path / "a" / "b" / "run" and path.is_dir()
    assert list(path.iterdir()) == [], "the writability probe leaves nothing behind"


def test_prepare_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.write_text("not a directory")
    with pytest.raises(RunDirError, match="exists and is not a directory") as caught:
        prepare_run_dir(target)
    assert str(target) in str(caught.value)
    with pytest.raises(RunDirError, match="cannot create run directory"):
        prepare_run_dir(target / "inside")


def test_prepare_refuses_an_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        if os.access(locked, os.W_OK):  # root (CAP_DAC_OVERRIDE) writes anywhere
            pytest.skip(f"euid {os.geteuid()} can write to a mode 0555 directory")
        with pytest.raises(RunDirError, match="is not writable") as caught:
            prepare_run_dir(locked)
        assert str(locked) in str(caught.value) and "--run-dir" in str(caught.value)
    finally:
        locked.chmod(0o755)


def test_run_id_is_created_once_and_stable(tmp_path: Path) -> None:
    first = run_id(tmp_path)
    assert len(first) == 32 and int(first, 16) >= 0
    assert run_id(tmp_path) == first
    assert json.loads((tmp_path / PRIVATE_DIR / RUN_FILE).read_text()) == {"run_id": first}
    other = tmp_path / "other"
    other.mkdir()
    assert run_id(other) != first, "each run directory gets its own id"


def test_concurrent_callers_all_get_the_same_id(tmp_path: Path) -> None:
    callers = 8
    barrier = threading.Barrier(callers)
    ids: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        barrier.wait()
        try:
            ids.append(run_id(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and len(ids) == callers
    assert len(set(ids)) == 1
    assert sorted(p.name for p in (tmp_path / PRIVATE_DIR).iterdir()) == [RUN_FILE]


def test_run_dir_with_checkpoints_but_no_id_file_takes_the_recorded_id(tmp_path: Path) -> None:
    store = run_storage(tmp_path)
    store.write(Manifest(kind="periodic", step=3, world_size=2, run_id="older-id"), b"a")
    store.write(Manifest(kind="jit", step=9, world_size=2, run_id="recorded-id"), b"b")
    garbled = store.write(Manifest(kind="jit", step=11, world_size=2, run_id="x"), b"c")
    (garbled / "manifest.json").write_text("{torn")
    assert not (tmp_path / PRIVATE_DIR / RUN_FILE).exists()
    assert run_id(tmp_path) == "recorded-id"
    assert run_id(tmp_path) == "recorded-id"  # and it is now written down


@pytest.mark.parametrize("content", ['{"run_', '{"id": "abc"}', "[]", ""])
def test_unreadable_id_file_is_refused_naming_it(tmp_path: Path, content: str) -> None:
    run_id(tmp_path)
    target = tmp_path / PRIVATE_DIR / RUN_FILE
    target.write_text(content)
    with pytest.raises(RunDirError) as caught:
        run_id(tmp_path)
    assert str(target) in str(caught.value) and "unreadable" in str(caught.value)
