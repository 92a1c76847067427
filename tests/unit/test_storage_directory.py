"""Checkpoints as directories (jitckpt.storage.directory): atomic writes,
verification, refusal of garbled manifests, the order of candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jitckpt import storage
from jitckpt.errors import CheckpointError


def manifest(step: int, rank: int = 0) -> storage.Manifest:
    return storage.Manifest(kind="jit", step=step, world_size=1, writer_rank=rank, attempt=0)


def test_write_is_atomic_and_verified(tmp_path: Path) -> None:
    path = storage.run_storage(tmp_path).write(manifest(3), b"payload-bytes")
    assert path.name == "step-000000003-jit-a0-r0"
    store = storage.run_storage(tmp_path)
    found = store.find(path.name)
    assert found is not None and found.manifest.files["state.pt"].size == len(b"payload-bytes")
    assert store.read_verified(found) == b"payload-bytes"
    assert not list(storage.checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_interrupted_write_leaves_no_candidate(tmp_path: Path) -> None:
    storage.run_storage(tmp_path).write(manifest(1), b"old")

    def die(point: str) -> None:
        if point == "payload_written":
            raise KeyboardInterrupt  # stands for the process dying before the manifest

    with pytest.raises(KeyboardInterrupt):
        storage.run_storage(tmp_path).write(manifest(2), b"new", on_point=die)
    found = storage.run_storage(tmp_path).candidates()
    assert [c.step for c in found] == [1]
    storage.run_storage(tmp_path).remove_stale_temporaries()
    assert not list(storage.checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_garbled_and_foreign_manifests_are_refused_with_reasons(tmp_path: Path) -> None:
    good = storage.run_storage(tmp_path).write(manifest(1), b"x")
    garbled = storage.run_storage(tmp_path).write(manifest(2), b"y")
    (garbled / storage.MANIFEST).write_text("{not json")
    foreign = storage.run_storage(tmp_path).write(manifest(3), b"z")
    data = json.loads((foreign / storage.MANIFEST).read_text())
    data["format"] = "someone-else/9"
    (foreign / storage.MANIFEST).write_text(json.dumps(data))
    results = [(c.name, problem) for c, _, problem in storage.run_storage(tmp_path).iter_valid()]
    # A checkpoint whose manifest is refused ranks by its directory name:
    # the newer garbled ones are reached, and refused, before the valid one.
    assert [name for name, _ in results] == [foreign.name, garbled.name, good.name]
    assert results[2][1] is None
    problems = sorted(p for _, p in results[:2] if p is not None)
    assert any("not valid JSON" in p and str(garbled) in p for p in problems)
    assert any("not a jitckpt/1 manifest" in p and str(foreign) in p for p in problems)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        (good / storage.PAYLOAD).write_bytes(b"q")
        store = storage.run_storage(tmp_path)
        store.read_verified(store.find(good.name))


def test_newest_step_wins_then_lowest_rank(tmp_path: Path) -> None:
    for step, rank in [(4, 3), (5, 2), (5, 1), (3, 0)]:
        storage.run_storage(tmp_path).write(manifest(step, rank), b"p")
    assert [
        (c.step, c.manifest.writer_rank) for c in storage.run_storage(tmp_path).candidates()
    ] == [
        (5, 1),
        (5, 2),
        (4, 3),
        (3, 0),
    ]


def test_multi_writer_commit_lists_and_verifies_every_file(tmp_path: Path) -> None:
    store = storage.DirectoryStorage(tmp_path)
    manifest = storage.Manifest(kind="jit", step=3, attempt=0, writer_rank=1, world_size=4)
    tmp = store.temporary(manifest)
    assert store.temporary(manifest) == tmp  # every writer derives the same directory
    (tmp / "__0_0.distcp").write_bytes(b"a" * 100)
    (tmp / ".metadata").write_bytes(b"m" * 10)
    path = store.commit(tmp, manifest, b"payload")
    assert path.name == "step-000000003-jit-a0-r1" and not tmp.exists()
    (candidate,) = store.candidates()
    assert sorted(candidate.manifest.files) == [".metadata", "__0_0.distcp", "state.pt"]
    store.verify_files(candidate)
    (path / "__0_0.distcp").write_bytes(b"b" * 100)
    with pytest.raises(CheckpointError, match="__0_0.distcp: checksum mismatch"):
        store.verify_files(candidate)


# -- drills ------------------------------------------------------------------------
